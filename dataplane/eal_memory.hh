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

}  // namespace moat
