#include "common/threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace pyknn {
namespace {

int default_threads() {
  // The CPUs this process may run on (taskset, cgroup cpusets), not all the machine's.
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::atomic<int> g_num_threads{0};

class Pool {
 public:
  ~Pool() { resize(0); }

  // Runs one job; `busy_` guards against concurrent and nested jobs (they run inline instead).
  void run(size_t ntasks, const std::function<void(size_t)>& fn, int nthreads) {
    if (ntasks == 0) return;
    bool expected = false;
    if (nthreads <= 1 || ntasks == 1 || !busy_.compare_exchange_strong(expected, true)) {
      for (size_t t = 0; t < ntasks; ++t) fn(t);
      return;
    }
    struct Release {
      std::atomic<bool>& b;
      ~Release() { b.store(false); }
    } release{busy_};
    size_t workers = std::min<size_t>(static_cast<size_t>(nthreads) - 1, ntasks - 1);
    resize(workers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      active_ = workers;
      job_workers_ = workers;
      error_ = nullptr;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    work();
    spin_until([&] { return active_.load() == 0; });
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return active_.load() == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    for (;;) {
      size_t t = next_.fetch_add(1);
      if (t >= ntasks_) break;
      try {
        (*fn_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(ntasks_);  // stop handing out tasks
      }
    }
  }

  // Grows the pool to at least n workers (n == 0 stops them all). Only called under busy_.
  void resize(size_t n) {
    if (n == 0) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      for (auto& th : threads_) th.join();
      threads_.clear();
      stop_ = false;
      return;
    }
    while (threads_.size() < n) {
      size_t index = threads_.size();
      threads_.emplace_back([this, index] { loop(index); });
    }
  }

  // Waking a sleeping thread took about 50 us on the KVM hosts, as long as a small search: a
  // thread that has just finished (or is waiting for the others) first spins this long on the
  // state it waits for, as OpenMP runtimes do, then sleeps. All shared state is still read under
  // mu_; the spin only decides when to take it.
  template <class Ready>
  static void spin_until(Ready ready) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    for (unsigned i = 0; !ready(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return;
    }
  }

  void loop(size_t index) {
    unsigned long long seen = 0;
    for (;;) {
      spin_until([&] { return generation_.load() != seen || stop_.load(); });
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_.load() || generation_.load() != seen; });
        if (stop_.load()) return;
        seen = generation_.load();
        // Workers beyond this job's count sit it out.
        if (index >= job_workers_) continue;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (active_.fetch_sub(1) == 1) done_cv_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t ntasks_ = 0;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> active_{0};
  size_t job_workers_ = 0;
  std::atomic<unsigned long long> generation_{0};
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;
  std::atomic<bool> busy_{false};
};

Pool* g_pool = nullptr;

// A child process created by fork() has none of the parent's worker threads: it gets a new, empty
// pool (the parent's is leaked in the child; destroying it would wait for threads that do not exist).
void reset_pool_in_child() { g_pool = new Pool(); }

Pool& pool() {
  // Leaked on purpose: joining threads during static destruction at interpreter exit can hang.
  static const bool init = [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
    return true;
  }();
  (void)init;
  return *g_pool;
}

}  // namespace

int num_threads() {
  int n = g_num_threads.load();
  return n > 0 ? n : default_threads();
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? std::min(n, kMaxThreads) : 0); }

void parallel_for(size_t ntasks, const std::function<void(size_t)>& fn) {
  pool().run(ntasks, fn, num_threads());
}

}  // namespace pyknn
