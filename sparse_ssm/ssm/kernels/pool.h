// Worker threads kept from one parallel loop to the next (`vec.h` parallel_for).  A decoding step makes
// ~75 parallel loops of 20-500 us each (its projections split by output rows); starting threads for
// each (~50 us a thread) would cost about what the split saves.  A loop's parts are claimed one at a
// time by the caller and the workers, so a worker that is slow to wake (its core busy, e.g. with
// PyTorch's own OpenMP threads) never holds the loop up: the caller runs the parts nobody has claimed.
// Between loops a worker polls for a short while (the next loop of a step comes within microseconds)
// and then sleeps on a condition variable.  One loop uses the pool at a time: a loop that finds it busy
// (another thread's, or a part that itself splits) runs on threads of its own.  After a fork the child
// (which has no workers) makes a new pool.
#pragma once

#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

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

  // part(k) for k in [0, parts), the caller taking part 0 and every part no worker has claimed; false
  // (nothing run) when the pool is busy
  bool run(int parts, const std::function<void(int64_t)>& part) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;   // (also from a part of this loop)
    for (; started_ < parts - 1; ++started_) std::thread(&WorkerPool::work, this, generation_.load()).detach();
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(m_);
      job_ = &part, parts_ = parts;
      gen = generation_.load(std::memory_order_relaxed) + 1;
      unfinished_.store(parts - 1, std::memory_order_relaxed);
      claims_.store(gen << 32 | 1, std::memory_order_relaxed);     // part 0 is the caller's
      generation_.store(gen, std::memory_order_release);
    }
    wake_.notify_all();
    part(0);
    for (int64_t k; (k = claim(gen, parts)) >= 0;) finish(part, k);
    for (int spin = 0; unfinished_.load(std::memory_order_acquire) > 0; ++spin) {   // parts workers run
      pause();
      if (spin > kSpins) {
        std::unique_lock<std::mutex> lock(m_);
        done_.wait(lock, [&] { return unfinished_.load(std::memory_order_acquire) == 0; });
      }
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static constexpr int kSpins = 4000;   // polls (a pause each, ~0.1 ms in all) before sleeping

  static void pause() {                 // a poll's pause: leaves the core to a thread beside it
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  // the next unclaimed part of loop `gen`, or -1 when there is none (or that loop is over); claims_ holds
  // the generation's low 32 bits (a server makes 2^32 loops in days)
  int64_t claim(uint64_t gen, int parts) {
    uint64_t c = claims_.load(std::memory_order_acquire);
    while ((c >> 32) == (gen & 0xffffffffu) && int64_t(c & 0xffffffffu) < parts)
      if (claims_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) return int64_t(c & 0xffffffffu);
    return -1;
  }

  void finish(const std::function<void(int64_t)>& part, int64_t k) {
    part(k);
    if (unfinished_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(m_);
      done_.notify_one();
    }
  }

  void work(uint64_t seen) {   // seen: the loop before the one that started this worker
    for (;;) {
      for (int spin = 0; spin < kSpins && generation_.load(std::memory_order_acquire) == seen; ++spin) pause();
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      const std::function<void(int64_t)>* job = job_;
      const int parts = parts_;
      lock.unlock();
      // a claimed part keeps the caller waiting (unfinished_), so `job` lives until it is done
      for (int64_t k; (k = claim(seen, parts)) >= 0;) finish(*job, k);
    }
  }

  const pid_t pid_ = getpid();
  std::atomic<bool> busy_{false};      // a loop holds the pool
  std::mutex m_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> claims_{0};     // the loop's generation << 32 | its next unclaimed part
  std::atomic<int> unfinished_{0};      // parts 1.. not yet done
  int started_ = 0;                     // workers (changed by the loop that holds busy_)
  const std::function<void(int64_t)>* job_ = nullptr;
  int parts_ = 0;
};

}  // namespace ssmk
