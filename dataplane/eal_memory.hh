// EAL memory without hugepages, made to behave like hugepage memory.
#pragma once

#include <tl/expected.hpp>

#include <cstddef>
#include <string>

namespace moat {

// Under --no-huge, EAL's memory is ordinary pageable shared memory: each
// page is faulted in by whoever touches it first, and the kernel may page
// it out. A worker would take those faults on its fast path (a ring's slots
// or a pool's objects reached for the first time). Hugepage memory is
// present and pinned from the start; this gives --no-huge memory the same
// by locking every allocated segment (mlock faults it in). Returns the bytes
// locked (0 with hugepages: nothing to do), or why locking failed (the
// daemon runs on, as before).
tl::expected<size_t, std::string> pin_eal_memory();

// Bytes a pool of `n` packet mbufs (rte_pktmbuf_pool_create's arguments)
// takes from a heap: objects, ring, header with its per-lcore caches, and
// what laying objects out within 2 MiB pages leaves unused.
size_t pktmbuf_pool_bytes(unsigned n, uint16_t priv_size, uint16_t data_room);

// Under --no-huge, a malloc heap of at least `bytes` on transparent huge
// pages, locked, for the packet pool: returns the heap (its socket id is the
// one to create the pool on), or why there is none (the caller keeps the
// pool in EAL memory).
// Why: the pool is the memory the fast path spreads over most widely (a
// receive path such as net_pcap's generator reaches a new 4 KiB page with
// nearly every packet), and under a hypervisor each TLB miss is a
// two-dimensional page walk. EAL's own --no-huge memory cannot have huge
// pages: DPDK 22.11 maps it from a memfd at an address that is not 2 MiB
// aligned (its base is rounded to 16 MiB, then its own tables come first),
// and shared memory gets huge pages only where address and file offset
// agree modulo 2 MiB. Private anonymous memory, mapped 2 MiB aligned and
// advised, gets them under the kernel's default THP setting (`madvise`);
// DPDK's external-heap API (rte_malloc_heap_memory_add) makes it a socket a
// mempool can live on. Its IOVAs are unknown (RTE_BAD_IOVA): fine for the
// virtual devices a --no-huge process drives, which copy.
struct HugePageHeap {
  int socket;   // for rte_pktmbuf_pool_create and rte_malloc_socket
  void* addr;   // the mapping, 2 MiB aligned
  size_t len;
};
tl::expected<HugePageHeap, std::string> huge_page_heap(const char* name, size_t bytes);

// Gives a heap's memory back (its pools must be freed first): a pool that
// could not be made on it should not leave locked memory behind.
void release_huge_page_heap(const char* name, const HugePageHeap& h);

}  // namespace moat
