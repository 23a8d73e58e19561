#include "dataplane/eal_memory.hh"

#include <rte_eal.h>
#include <rte_memory.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <fmt/format.h>

namespace moat {

namespace {

struct PinWalk {
  size_t bytes = 0;
  int err = 0;
  const void* at = nullptr;
};

int pin_chunk(const rte_memseg_list* msl, const rte_memseg* ms, size_t len, void* arg) {
  auto* p = static_cast<PinWalk*>(arg);
  if (msl->external) return 0;  // not EAL's: whoever registered it owns its pages
  if (mlock(ms->addr, len) != 0) {
    p->err = errno;
    p->at = ms->addr;
    return 1;
  }
  p->bytes += len;
  return 0;
}

}  // namespace

tl::expected<size_t, std::string> pin_eal_memory() {
  if (rte_eal_has_hugepages()) return 0;
  PinWalk p;
  int rc = rte_memseg_contig_walk(pin_chunk, &p);
  if (rc < 0) return tl::unexpected(std::string("walking EAL memory segments failed"));
  if (p.err)
    return tl::unexpected(fmt::format("locking EAL memory at {} failed after {} MB: {}{}", p.at, p.bytes >> 20,
                                      std::strerror(p.err),
                                      p.err == ENOMEM || p.err == EPERM ? " (RLIMIT_MEMLOCK, or no CAP_IPC_LOCK)" : ""));
  return p.bytes;
}

}  // namespace moat
