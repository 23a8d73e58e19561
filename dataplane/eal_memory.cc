#include "dataplane/eal_memory.hh"

#include <rte_common.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_memory.h>
#include <rte_mempool.h>
#include <rte_ring.h>
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

constexpr size_t kHugePage = size_t(2) << 20;

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

size_t pktmbuf_pool_bytes(unsigned n, uint16_t priv_size, uint16_t data_room) {
  rte_mempool_objsz sz{};
  size_t obj = rte_mempool_calc_obj_size(uint32_t(sizeof(rte_mbuf) + priv_size + data_room), 0, &sz);
  size_t objects = size_t(n) * obj;
  // Objects do not cross a page: each 2 MiB page may leave up to one unused.
  objects += (objects / kHugePage + 1) * obj;
  size_t ring = size_t(rte_ring_get_memsize(rte_align32pow2(n + 1)));
  size_t header = sizeof(rte_mempool) + size_t(RTE_MAX_LCORE) * sizeof(rte_mempool_cache) +
                  sizeof(rte_pktmbuf_pool_private);
  // Each allocation's malloc element and alignment: a page's slack covers them.
  return RTE_ALIGN_CEIL(objects + ring + header + kHugePage, kHugePage);
}

tl::expected<HugePageHeap, std::string> huge_page_heap(const char* name, size_t bytes) {
  bytes = RTE_ALIGN_CEIL(bytes, kHugePage);
  // Over-map by a page, keep the 2 MiB-aligned part: only aligned 2 MiB
  // ranges of a mapping can be huge pages.
  void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return tl::unexpected(fmt::format("mapping {} MB: {}", bytes >> 20, std::strerror(errno)));
  auto base = reinterpret_cast<uintptr_t>(raw);
  uintptr_t at = RTE_ALIGN_CEIL(base, uintptr_t(kHugePage));
  if (at > base) munmap(raw, at - base);
  if (size_t tail = base + kHugePage - at) munmap(reinterpret_cast<void*>(at + bytes), tail);
  void* p = reinterpret_cast<void*>(at);
  auto fail = [&](std::string why) {
    munmap(p, bytes);
    return tl::unexpected(std::move(why));
  };
  // Advice, not a demand: without THP the heap still works on 4 KiB pages.
  (void)madvise(p, bytes, MADV_HUGEPAGE);
  // Present and pinned before a worker touches it, as hugepage memory is;
  // the faults mlock takes here are where the huge pages are allocated.
  if (mlock(p, bytes) != 0)
    return fail(fmt::format("locking {} MB: {}", bytes >> 20, std::strerror(errno)));
  if (rte_malloc_heap_create(name) != 0)
    return fail(fmt::format("heap {}: {}", name, rte_strerror(rte_errno)));
  if (rte_malloc_heap_memory_add(name, p, bytes, nullptr, 0, kHugePage) != 0) {
    std::string why = fmt::format("adding {} MB to heap {}: {}", bytes >> 20, name, rte_strerror(rte_errno));
    rte_malloc_heap_destroy(name);
    return fail(std::move(why));
  }
  return HugePageHeap{rte_malloc_heap_get_socket(name), p, bytes};
}

void release_huge_page_heap(const char* name, const HugePageHeap& h) {
  rte_malloc_heap_memory_remove(name, h.addr, h.len);
  rte_malloc_heap_destroy(name);
  munmap(h.addr, h.len);
}

}  // namespace moat
