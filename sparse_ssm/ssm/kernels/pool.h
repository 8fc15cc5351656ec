// Worker threads kept from one parallel loop to the next (`vec.h` parallel_for).  A decoding step makes
// ~75 parallel loops of 20-500 us each (its projections split by output rows); starting threads for
// each (~50 us a thread) would cost about what the split saves.  The caller runs part 0 and threads - 1
// workers the others; between loops a worker spins for a short while (the next loop of a step comes
// within microseconds) and then sleeps on a condition variable.  One loop uses the pool at a time: a
// loop that finds it busy (another thread's, or a part that itself splits) gets threads of its own.
// After a fork the child (which has no workers) makes a new pool.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ssmk {

class WorkerPool {
 public:
  // the pool of this process (made on first use; never destroyed: its workers are detached)
  static WorkerPool& get() {
    static std::mutex made;
    static WorkerPool* pool = nullptr;
    std::lock_guard<std::mutex> lock(made);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new WorkerPool();   // a forked child's is new
    return *pool;
  }

  // part(k) for k in [0, parts): part 0 on the calling thread; false (nothing run) when the pool is busy
  bool run(int parts, const std::function<void(int64_t)>& part) {
    if (!busy_.try_lock()) return false;
    while ((int)started_ < parts - 1) {
      // the generation before this loop's: the worker runs its part even if it starts after the loop did
      std::thread(&WorkerPool::work, this, (int)++started_, generation_.load()).detach();
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &part, parts_ = parts;
      remaining_.store(parts - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    part(0);
    for (int spin = 0; remaining_.load(std::memory_order_acquire) > 0; ++spin) {
      if (spin > kSpins) {
        std::unique_lock<std::mutex> lock(m_);
        done_.wait(lock, [&] { return remaining_.load(std::memory_order_acquire) == 0; });
        break;
      }
    }
    busy_.unlock();
    return true;
  }

 private:
  static constexpr int kSpins = 200000;   // ~0.1-0.5 ms of polling before sleeping

  void work(int id, uint64_t seen) {
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin) {
      }
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (id >= parts_) continue;                     // this loop has fewer parts than workers
      const std::function<void(int64_t)>* job = job_;
      lock.unlock();
      (*job)(id);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> done_lock(m_);
        done_.notify_one();
      }
    }
  }

  const pid_t pid_ = getpid();
  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<int> started_{0};
  const std::function<void(int64_t)>* job_ = nullptr;
  int parts_ = 0;
};

}  // namespace ssmk
