// A small fixed pool of std::threads (no OpenMP: it clashes with other runtimes in one process).
#pragma once
#include <cstddef>
#include <functional>

namespace pyknn {

// Number of threads parallel work may use (>= 1). Default: the machine's hardware threads.
int num_threads();
constexpr int kMaxThreads = 1024;
// Sets the thread count (at most kMaxThreads); n <= 0 restores the default.
void set_num_threads(int n);

// Runs fn(task) for task in [0, ntasks), spread over the pool; the caller works too. Returns when all
// tasks are done; the first exception thrown by a task is rethrown here (others are dropped).
// When the pool is already running another job (a concurrent caller or a nested call), the tasks
// run on the calling thread instead, so concurrent searches never deadlock or oversubscribe.
void parallel_for(size_t ntasks, const std::function<void(size_t)>& fn);

}  // namespace pyknn
