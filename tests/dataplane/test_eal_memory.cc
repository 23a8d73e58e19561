// Under --no-huge (as the tests run EAL), pinning makes EAL memory present
// before anyone touches it, as hugepage memory is.
#include <gtest/gtest.h>
#include <rte_eal.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <sys/mman.h>
#include <unistd.h>

#include <rte_errno.h>
#include <rte_malloc.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dataplane/eal_memory.hh"
#include "dataplane/packet.hh"

namespace moat {
namespace {

// Pages of [p, p + len) the kernel has present.
size_t resident_pages(const void* p, size_t len) {
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  auto* a = reinterpret_cast<uint8_t*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  size_t n = (len + page - 1) / page;
  std::vector<unsigned char> v(n);
  if (mincore(a, n * page, v.data()) != 0) return 0;
  size_t r = 0;
  for (unsigned char c : v) r += c & 1;
  return r;
}

struct Residency {
  size_t pages = 0, resident = 0;
};

// How much of EAL's memory the kernel has present.
Residency eal_residency() {
  Residency r;
  rte_memseg_contig_walk(
      [](const rte_memseg_list* msl, const rte_memseg* ms, size_t len, void* arg) {
        auto* r = static_cast<Residency*>(arg);
        if (msl->external) return 0;
        r->pages += len / size_t(sysconf(_SC_PAGESIZE));
        r->resident += resident_pages(ms->addr, len);
        return 0;
      },
      &r);
  return r;
}

TEST(EalMemory, PinningMakesAllOfEalMemoryResident) {
  ASSERT_FALSE(rte_eal_has_hugepages());
  // A zone no one has written (rte_memzone_reserve does not clear it), so
  // that some memory is untouched whatever ran before in this process.
  constexpr size_t kLen = 64u << 20;
  const rte_memzone* mz = rte_memzone_reserve("pin-test", kLen, SOCKET_ID_ANY, 0);
  ASSERT_NE(mz, nullptr);
  Residency before = eal_residency();
  ASSERT_GT(before.pages, kLen / size_t(sysconf(_SC_PAGESIZE)));
  EXPECT_LT(before.resident, before.pages) << "all EAL memory was present before pinning: the test cannot tell";

  auto pinned = pin_eal_memory();
  ASSERT_TRUE(pinned) << pinned.error();
  Residency after = eal_residency();
  EXPECT_EQ(*pinned, after.pages * size_t(sysconf(_SC_PAGESIZE)));
  EXPECT_EQ(after.resident, after.pages);
  rte_memzone_free(mz);
}

// The kernel's account of the mapping that holds `p` (/proc/self/smaps).
struct Vma {
  uintptr_t start = 0, end = 0;
  size_t huge_kb = 0, locked_kb = 0;
  bool advised = false;  // VmFlags "hg": MADV_HUGEPAGE
};

// The kernel's THP setting for anonymous memory ("always", "madvise" or "never").
std::string thp_mode() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all;
  std::getline(f, all);
  auto a = all.find('['), b = all.find(']');
  return a == std::string::npos || b == std::string::npos ? "never" : all.substr(a + 1, b - a - 1);
}

Vma vma_of(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  std::ifstream f("/proc/self/smaps");
  std::string line;
  Vma v;
  bool in = false;
  while (std::getline(f, line)) {
    uintptr_t s = 0, e = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " ", &s, &e) == 2 && line.find(':') > line.find(' ')) {
      if (in) break;
      in = s <= a && a < e;
      if (in) v.start = s, v.end = e;
      continue;
    }
    if (!in) continue;
    std::istringstream w(line);
    std::string key;
    size_t kb = 0;
    w >> key >> kb;
    if (key == "AnonHugePages:") v.huge_kb = kb;
    if (key == "Locked:") v.locked_kb = kb;
    if (key == "VmFlags:") v.advised = (" " + line + " ").find(" hg ") != std::string::npos;
  }
  return v;
}

struct PoolWalk {
  int socket;
  unsigned objects = 0, elsewhere = 0;
};

// The packet pool on its own heap: every mbuf there, on locked huge pages,
// sized by pktmbuf_pool_bytes so that a pool of any size fits.
TEST(EalMemory, PacketPoolHeapIsLockedHugePagesThatHoldTheWholePool) {
  ASSERT_FALSE(rte_eal_has_hugepages());
  for (unsigned n : {4095u, 65535u}) {
    SCOPED_TRACE(n);
    std::string name = "test_packets_" + std::to_string(n);
    size_t bytes = pktmbuf_pool_bytes(n, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE);
    auto heap = huge_page_heap(name.c_str(), bytes);
    ASSERT_TRUE(heap) << heap.error();
    rte_mempool* mp = rte_pktmbuf_pool_create(("hp_" + std::to_string(n)).c_str(), n, 256, kMbufPrivSize,
                                              RTE_MBUF_DEFAULT_BUF_SIZE, heap->socket);
    ASSERT_NE(mp, nullptr) << "the heap is too small for the pool it was sized for: " << rte_strerror(rte_errno);
    EXPECT_EQ(mp->size, n);
    // Not wasteful either: the objects plus the header (RTE_MAX_LCORE caches),
    // the ring and a few 2 MiB pages.
    rte_mempool_objsz sz{};
    size_t obj = rte_mempool_calc_obj_size(sizeof(rte_mbuf) + kMbufPrivSize + RTE_MBUF_DEFAULT_BUF_SIZE, 0, &sz);
    EXPECT_LE(bytes, n * obj + (8u << 20));

    PoolWalk pw{heap->socket};
    rte_mempool_obj_iter(
        mp,
        [](rte_mempool*, void* arg, void* o, unsigned) {
          auto* pw = static_cast<PoolWalk*>(arg);
          const rte_memseg_list* msl = rte_mem_virt2memseg_list(o);
          pw->objects++;
          if (!msl || !msl->external || msl->socket_id != pw->socket) pw->elsewhere++;
        },
        &pw);
    EXPECT_EQ(pw.objects, n);
    EXPECT_EQ(pw.elsewhere, 0u) << "mbufs outside the huge-page heap";

    rte_mbuf* m = rte_pktmbuf_alloc(mp);
    ASSERT_NE(m, nullptr);
    Vma v = vma_of(m);
    ASSERT_NE(v.end, 0u);
    size_t vma_kb = (v.end - v.start) >> 10;
    EXPECT_EQ(v.start % (2u << 20), 0u) << "not 2 MiB aligned: no page of it can be huge";
    EXPECT_EQ(v.locked_kb, vma_kb) << "not all of it pinned";
    EXPECT_TRUE(v.advised) << "not advised for huge pages";
    // Where the kernel gives advised memory huge pages (its default), it
    // must have given them; under "never" the heap runs on 4 KiB pages.
    if (thp_mode() != "never") {
      EXPECT_GE(v.huge_kb * 4, vma_kb * 3) << v.huge_kb << " of " << vma_kb << " kB on huge pages (THP " << thp_mode() << ")";
    }
    std::memset(rte_pktmbuf_mtod(m, void*), 0xab, 64);
    rte_pktmbuf_free(m);
    rte_mempool_free(mp);
  }
}

// A heap too small for its pool (moatd's fallback): the pool is refused,
// and releasing the heap gives its memory back, no longer locked or mapped.
TEST(EalMemory, AHeapTooSmallForItsPoolIsGivenBack) {
  constexpr unsigned kN = 4095;
  auto heap = huge_page_heap("test_small", 2u << 20);
  ASSERT_TRUE(heap) << heap.error();
  EXPECT_EQ(rte_pktmbuf_pool_create("hp_small", kN, 256, kMbufPrivSize, RTE_MBUF_DEFAULT_BUF_SIZE, heap->socket),
            nullptr);
  EXPECT_EQ(vma_of(heap->addr).locked_kb, heap->len >> 10);
  release_huge_page_heap("test_small", *heap);
  EXPECT_LT(rte_malloc_heap_get_socket("test_small"), 0) << "the heap is still there";
  EXPECT_EQ(vma_of(heap->addr).end, 0u) << "its memory is still mapped";
}

}  // namespace
}  // namespace moat
