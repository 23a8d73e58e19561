// GoogleTest main for tests that need mbufs: starts EAL on virtual memory
// only (no hugepages, no PCI, no shared files) so tests run anywhere.
#include <gtest/gtest.h>
#include <rte_eal.h>

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  const char* eal[] = {"moat-test", "--no-huge", "-m", "2048", "--no-pci", "--no-shconf", "-l", "0", "--log-level", "error"};
  if (rte_eal_init(sizeof(eal) / sizeof(eal[0]), const_cast<char**>(eal)) < 0) {
    fprintf(stderr, "EAL init failed\n");
    return 1;
  }
  int rc = RUN_ALL_TESTS();
  rte_eal_cleanup();
  return rc;
}
