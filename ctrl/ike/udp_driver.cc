#include "ctrl/ike/udp_driver.hh"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

namespace moat::ike {

UdpDriver::~UdpDriver() {
  if (fd500_ >= 0) close(fd500_);
  if (fd4500_ >= 0) close(fd4500_);
}

uint64_t UdpDriver::now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000 + uint64_t(ts.tv_nsec) / 1000000;
}

static tl::expected<int, std::string> bind_udp(std::optional<IpAddr> addr, uint16_t port) {
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return tl::unexpected(fmt::format("socket: {}", strerror(errno)));
  int one = 1;
  // IP_PKTINFO: learn which of our addresses a datagram was sent to, and
  // answer from that same address.
  setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_port = htons(port);
  if (addr) memcpy(&sin.sin_addr, addr->b.data(), 4);
  if (bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof sin) < 0) {
    std::string e = fmt::format("bind UDP {}: {}", port, strerror(errno));
    close(fd);
    return tl::unexpected(e);
  }
  return fd;
}

tl::expected<void, std::string> UdpDriver::open(std::optional<IpAddr> addr) {
  if (addr && !addr->is_v4()) return tl::unexpected(std::string("the UDP driver speaks IPv4 only"));
  auto a = bind_udp(addr, kIkePort);
  if (!a) return tl::unexpected(a.error());
  fd500_ = *a;
  auto b = bind_udp(addr, kNattPort);
  if (!b) return tl::unexpected(b.error());
  fd4500_ = *b;
  return {};
}

void UdpDriver::drain(int fd, uint16_t port) {
  uint8_t buf[kMaxMessage];
  for (int n = 0; n < 64; ++n) {
    sockaddr_in from{};
    iovec iov{buf, sizeof buf};
    alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(in_pktinfo))];
    msghdr mh{};
    mh.msg_name = &from;
    mh.msg_namelen = sizeof from;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof cbuf;
    ssize_t len = recvmsg(fd, &mh, 0);
    if (len < 0) return;
    Endpoint local{IpAddr{}, port}, remote;
    remote.addr.family = AF_INET;
    memcpy(remote.addr.b.data(), &from.sin_addr, 4);
    remote.port = ntohs(from.sin_port);
    for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
      if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
        in_pktinfo pi;
        memcpy(&pi, CMSG_DATA(c), sizeof pi);
        local.addr.family = AF_INET;
        memcpy(local.addr.b.data(), &pi.ipi_addr, 4);
      }
    if (esp_ && port == kNattPort && local.addr.family && len > 8 &&
        (buf[0] | buf[1] | buf[2] | buf[3]) != 0) {
      esp_(local, remote, ByteView(buf, size_t(len)));
      continue;
    }
    if (engine_ && local.addr.family) engine_->receive(local, remote, ByteView(buf, size_t(len)), now_ms());
  }
}

void UdpDriver::run_once(int max_wait_ms) {
  uint64_t now = now_ms();
  int wait = max_wait_ms;
  if (engine_) {
    uint64_t d = engine_->next_deadline();
    if (d <= now) wait = 0;
    else if (d - now < uint64_t(wait)) wait = int(d - now);
  }
  pollfd p[2] = {{fd500_, POLLIN, 0}, {fd4500_, POLLIN, 0}};
  int r = poll(p, 2, wait);
  if (r > 0) {
    if (p[0].revents & POLLIN) drain(fd500_, kIkePort);
    if (p[1].revents & POLLIN) drain(fd4500_, kNattPort);
  }
  if (engine_) engine_->tick(now_ms());
}

void UdpDriver::send(const Endpoint& local, const Endpoint& remote, ByteView data) {
  int fd = local.port == kIkePort ? fd500_ : fd4500_;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(remote.port);
  memcpy(&to.sin_addr, remote.addr.b.data(), 4);
  iovec iov{const_cast<uint8_t*>(data.data()), data.size()};
  alignas(cmsghdr) char cbuf[CMSG_SPACE(sizeof(in_pktinfo))] = {};
  msghdr mh{};
  mh.msg_name = &to;
  mh.msg_namelen = sizeof to;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cbuf;
  mh.msg_controllen = sizeof cbuf;
  cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = IPPROTO_IP;
  c->cmsg_type = IP_PKTINFO;
  c->cmsg_len = CMSG_LEN(sizeof(in_pktinfo));
  in_pktinfo pi{};
  memcpy(&pi.ipi_spec_dst, local.addr.b.data(), 4);
  memcpy(CMSG_DATA(c), &pi, sizeof pi);
  if (sendmsg(fd, &mh, 0) < 0) ++send_errors_;
}

std::optional<IpAddr> UdpDriver::source_for(const IpAddr& remote) {
  if (!remote.is_v4()) return std::nullopt;
  // connect() on a UDP socket asks the kernel's routing for the source address.
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(kIkePort);
  memcpy(&to.sin_addr, remote.b.data(), 4);
  std::optional<IpAddr> r;
  sockaddr_in me{};
  socklen_t len = sizeof me;
  if (connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&me), &len) == 0) {
    IpAddr a;
    a.family = AF_INET;
    memcpy(a.b.data(), &me.sin_addr, 4);
    r = a;
  }
  close(fd);
  return r;
}

}  // namespace moat::ike
