// Under --no-huge (as the tests run EAL), pinning makes EAL memory resident
// before anyone touches it, as hugepage memory is.
#include <gtest/gtest.h>
#include <rte_eal.h>
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

TEST(EalMemory, PinningMakesUntouchedEalMemoryResident) {
  ASSERT_FALSE(rte_eal_has_hugepages());
  // A zone no one has written: rte_memzone_reserve does not clear it.
  constexpr size_t kLen = 16u << 20;
  const rte_memzone* mz = rte_memzone_reserve("pin-test", kLen, SOCKET_ID_ANY, 0);
  ASSERT_NE(mz, nullptr);
  size_t pages = kLen / size_t(sysconf(_SC_PAGESIZE));
  // Its inside (the allocator writes only element headers at the ends).
  const uint8_t* inner = static_cast<const uint8_t*>(mz->addr) + (1u << 20);
  size_t inner_len = kLen - (2u << 20);
  size_t before = resident_pages(inner, inner_len);
  EXPECT_LT(before, pages / 2) << "the zone was resident before pinning: the test cannot tell";

  auto pinned = pin_eal_memory();
  ASSERT_TRUE(pinned) << pinned.error();
  EXPECT_GE(*pinned, kLen);
  EXPECT_EQ(resident_pages(inner, inner_len), inner_len / size_t(sysconf(_SC_PAGESIZE)));
  rte_memzone_free(mz);
}

}  // namespace
}  // namespace moat
