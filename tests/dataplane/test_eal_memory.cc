// Under --no-huge (as the tests run EAL), pinning makes EAL memory present
// before anyone touches it, as hugepage memory is.
#include <gtest/gtest.h>
#include <rte_eal.h>
#include <rte_memory.h>
#include <rte_memzone.h>
#include <sys/mman.h>
#include <unistd.h>

#include <vector>

#include "dataplane/eal_memory.hh"

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

}  // namespace
}  // namespace moat
