#include "ctrl/punt.hh"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <net/route.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

namespace moat {

namespace {

// Enters a network namespace for the lifetime of the object and returns to
// the original one after. TAP creation and address ioctls act on the calling
// thread's namespace, so this is how the TAP lands in the services namespace.
class NetnsGuard {
 public:
  tl::expected<void, std::string> enter(const std::string& netns) {
    if (netns.empty()) return {};
    self_ = ::open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    std::string path = "/run/netns/" + netns;
    int target = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (self_ < 0 || target < 0) {
      if (target >= 0) close(target);
      return tl::unexpected(fmt::format("punt.netns: cannot open {}: {}", path, strerror(errno)));
    }
    int rc = setns(target, CLONE_NEWNET);
    int err = errno;
    close(target);
    if (rc != 0) return tl::unexpected(fmt::format("punt.netns: setns {}: {}", path, strerror(err)));
    return {};
  }
  ~NetnsGuard() {
    if (self_ >= 0) {
      setns(self_, CLONE_NEWNET);
      close(self_);
    }
  }

 private:
  int self_ = -1;
};

}  // namespace

tl::expected<void, std::string> in_netns(const std::string& netns, const std::function<void()>& fn) {
  NetnsGuard g;
  if (auto ok = g.enter(netns); !ok) return ok;
  fn();
  return {};
}

namespace {

sockaddr in_addr_of(uint32_t host_order) {
  sockaddr sa{};
  auto* sin = reinterpret_cast<sockaddr_in*>(&sa);
  sin->sin_family = AF_INET;
  sin->sin_addr.s_addr = htonl(host_order);
  return sa;
}

}  // namespace

PuntTap::~PuntTap() {
  if (fd_ >= 0) close(fd_);
}

tl::expected<void, std::string> PuntTap::open(const std::string& name, const rte_ether_addr& mac, uint32_t addr,
                                              uint8_t plen, uint16_t mtu, const std::string& netns,
                                              bool default_route) {
  NetnsGuard ns;
  if (auto r = ns.enter(netns); !r) return r;
  auto fail = [&](const char* step) {
    return tl::unexpected(fmt::format("punt TAP {}: {}: {}", name, step, strerror(errno)));
  };
  fd_ = ::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd_ < 0) return fail("open /dev/net/tun");
  ifreq ifr{};
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  std::snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name.c_str());
  if (ioctl(fd_, TUNSETIFF, &ifr) < 0) return fail("TUNSETIFF");
  name_ = ifr.ifr_name;

  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return fail("socket");
  struct Closer {
    int s;
    ~Closer() { close(s); }
  } closer{s};
  ifreq r{};
  std::snprintf(r.ifr_name, IFNAMSIZ, "%s", name_.c_str());
  r.ifr_hwaddr.sa_family = 1;  // ARPHRD_ETHER
  std::memcpy(r.ifr_hwaddr.sa_data, mac.addr_bytes, 6);
  if (ioctl(s, SIOCSIFHWADDR, &r) < 0) return fail("set MAC");
  r.ifr_mtu = mtu;
  if (ioctl(s, SIOCSIFMTU, &r) < 0) return fail("set MTU");
  if (addr) {
    r.ifr_addr = in_addr_of(addr);
    if (ioctl(s, SIOCSIFADDR, &r) < 0) return fail("set address");
    r.ifr_netmask = in_addr_of(plen ? ~uint32_t(0) << (32 - plen) : 0);
    if (ioctl(s, SIOCSIFNETMASK, &r) < 0) return fail("set netmask");
  }
  // IPv6 would only add router solicitations nobody routes.
  if (int f = ::open(fmt::format("/proc/sys/net/ipv6/conf/{}/disable_ipv6", name_).c_str(), O_WRONLY | O_CLOEXEC); f >= 0) {
    (void)!write(f, "1", 1);
    close(f);
  }
  if (ioctl(s, SIOCGIFFLAGS, &r) < 0) return fail("get flags");
  r.ifr_flags |= IFF_UP | IFF_NOARP;
  if (ioctl(s, SIOCSIFFLAGS, &r) < 0) return fail("set flags");
  if (default_route) {
    // Replies to hosts beyond the connected subnets leave through the TAP
    // and are routed by Moat; an existing default route is left alone.
    rtentry rt{};
    rt.rt_dst = in_addr_of(0);
    rt.rt_genmask = in_addr_of(0);
    rt.rt_flags = RTF_UP;
    rt.rt_dev = const_cast<char*>(name_.c_str());
    rt.rt_metric = 1000;
    if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST) return fail("add default route");
  }
  return {};
}

tl::expected<void, std::string> PuntTap::set_address(uint32_t addr, uint8_t plen, const std::string& netns) {
  NetnsGuard ns;
  if (auto r = ns.enter(netns); !r) return r;
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) return tl::unexpected(fmt::format("punt TAP {}: socket: {}", name_, strerror(errno)));
  ifreq r{};
  std::snprintf(r.ifr_name, IFNAMSIZ, "%s", name_.c_str());
  r.ifr_addr = in_addr_of(addr);
  int rc = ioctl(s, SIOCSIFADDR, &r);
  if (rc == 0) {
    r.ifr_netmask = in_addr_of(plen ? ~uint32_t(0) << (32 - plen) : 0);
    rc = ioctl(s, SIOCSIFNETMASK, &r);
  }
  int err = errno;
  close(s);
  if (rc != 0) return tl::unexpected(fmt::format("punt TAP {}: set address: {}", name_, strerror(err)));
  return {};
}

}  // namespace moat
