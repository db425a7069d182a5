// The parallel driver: runs a per-task worker over a meta-batch with OpenMP,
// catches every exception inside the parallel region (none may cross it) and
// reports the lowest failing task, and combines per-task results in a fixed
// order of fixed blocks.
//
// Determinism contract (docs/design.md, "Reduction order"): per-task results are
// written to their own slots, then summed in blocks of kReduceBlock tasks
// (sequentially inside a block, blocks in order). Neither the block size nor
// the chunking depends on the thread count, so the result is bitwise the same
// for any n_threads, and a distributed run whose shards are whole blocks can
// reproduce it by summing block partials in order.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.hpp"

namespace fastmaml {

constexpr index_t kReduceBlock = 64;
// Per-task result slots are kept for at most this many doubles per chunk; a
// chunk is always a whole number of reduction blocks (shape-only choice).
constexpr index_t kChunkDoubles = index_t(1) << 23;  // 64 MiB
// Below this many multiply-adds per thread a parallel region costs more than
// it saves (and on a loaded machine a descheduled worker stalls the join), so
// small batches use fewer threads. Shape-only: results never depend on it.
constexpr double kMinWorkPerThread = 2.0e5;

// nonfinite_input: a feature of the batch is NaN or infinite; message names
// the array ("support_X", "query_X", or "X" for index-form tasks).
enum class ErrorCode : int {
  ok = 0,
  diverged = 1,
  nonfinite_query = 2,
  no_memory = 3,
  internal = 4,
  nonfinite_grad = 5,
  nonfinite_input = 6
};

struct TaskStatus {
  ErrorCode code = ErrorCode::ok;
  index_t task = -1;
  index_t step = -1;
  std::string message;  // filled only for internal errors
  bool ok() const { return code == ErrorCode::ok; }
};

// fork() and OpenMP: libgomp's thread pool does not survive a fork, and a
// child that opens a parallel region after its parent ran one with two or
// more threads waits forever for workers that do not exist. The bindings
// register `note_fork_child` with pthread_atfork; a child forked after the
// pool started then runs every call serially (one thread never touches the
// pool). Results do not change: they are bitwise independent of the thread
// count (docs/design.md section 4).
inline std::atomic<bool>& pool_started() {
  static std::atomic<bool> started{false};
  return started;
}
inline std::atomic<bool>& serial_after_fork() {
  static std::atomic<bool> serial{false};
  return serial;
}
// Async-signal-safe (lock-free atomics only): it runs in the child of fork().
inline void note_fork_child() {
  if (pool_started().load(std::memory_order_relaxed)) serial_after_fork().store(true, std::memory_order_relaxed);
}

// The thread count a call asks for, before the fork rule.
inline int requested_threads(int n_threads) {
#ifdef _OPENMP
  return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

inline int resolve_threads(int n_threads) {
#ifdef _OPENMP
  if (serial_after_fork().load(std::memory_order_relaxed)) return 1;
  return requested_threads(n_threads);
#else
  (void)n_threads;
  return 1;
#endif
}

inline bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Runs a group worker over tasks [0, n_tasks) split into groups of
// consecutive tasks: `group_end(t)` is the end of the group starting at t
// (a shape-only rule; a group never crosses a kReduceBlock boundary, so
// neither the chunks nor the reduction blocks depend on it). `make_worker()`
// is called once per thread and returns an object with
//     void operator()(index_t t0, index_t g, double* slots, index_t slot_len,
//                     TaskStatus* status)
// which writes the `slot_len` doubles of each task t0 + l (l < g) into
// slots + l * slot_len and a failure, if any, into status[l].
// If `total` is non-null it receives the block-ordered sum of the slots.
// Returns the error of the lowest-numbered failing task, if any.
// Entries per piece of run_groups' block sums (256 doubles: 2 KiB per slot).
constexpr index_t kSumRange = 256;

// sum[k] = ((0.0 + s_0[k]) + s_1[k]) + ... + s_{count-1}[k] for k < len,
// s_i = s0 + i * stride: each entry the in-order sum of the block's slots,
// 32 entries at a time in registers (vectorised across entries, so no entry's
// bits change). As a plain loop of sum[k] += s[k] it ran one entry at a time
// (the build turns off GCC's alias versioning) and took 6% of a call at E1's
// shape (32 tasks, d = 784, one thread).
FASTMAML_CLONES inline void sum_slots(double* FASTMAML_RESTRICT sum, const double* FASTMAML_RESTRICT s0,
                                      index_t stride, index_t count, index_t len) {
  constexpr index_t S = 32;
  index_t k = 0;
  for (; k + S <= len; k += S) {
    double acc[S];
    for (index_t l = 0; l < S; ++l) acc[l] = 0.0;
    for (index_t i = 0; i < count; ++i) {
      const double* FASTMAML_RESTRICT s = s0 + i * stride + k;
      for (index_t l = 0; l < S; ++l) acc[l] += s[l];
    }
    for (index_t l = 0; l < S; ++l) sum[k + l] = acc[l];
  }
  for (; k < len; ++k) {
    double acc = 0.0;
    for (index_t i = 0; i < count; ++i) acc += s0[i * stride + k];
    sum[k] = acc;
  }
}

template <class GroupEnd, class MakeWorker>
TaskStatus run_groups(index_t n_tasks, index_t slot_len, int n_threads, GroupEnd&& group_end,
                      MakeWorker&& make_worker, double* total, double work_per_task = 1e9,
                      double* blocks_out = nullptr) {
  TaskStatus status;
  int threads = resolve_threads(n_threads);
  const double useful = static_cast<double>(n_tasks) * work_per_task / kMinWorkPerThread;
  if (useful < threads) threads = std::max(1, static_cast<int>(useful));
  // More threads than tasks only adds idle workers (and a huge n_threads
  // would ask the OpenMP runtime for that many).
  if (static_cast<index_t>(threads) > n_tasks) threads = static_cast<int>(std::max<index_t>(1, n_tasks));
  if (threads > 1) pool_started().store(true, std::memory_order_relaxed);
  index_t chunk = n_tasks;
  if (slot_len > 0) {
    const index_t blocks = std::max<index_t>(1, kChunkDoubles / (slot_len * kReduceBlock));
    chunk = std::min(n_tasks, blocks * kReduceBlock);
  }
  if (chunk <= 0) chunk = 1;
  // The slots are zeroed group by group inside the parallel loop (by the
  // thread that fills them), and each reduction block's sum is formed there
  // too, one block per thread at a time: the serial part after the join is
  // only the in-order sum of the block sums. (W3's 4096 slots were 2.2 MB,
  // zeroed and summed by one thread.)
  const index_t slot_len0 = std::max<index_t>(slot_len, 0);
  const index_t max_blocks = (chunk + kReduceBlock - 1) / kReduceBlock;
  std::unique_ptr<double[]> slots;
  std::vector<double> block_sums;
  std::vector<TaskStatus> task_status;
  std::vector<index_t> starts;
  try {
    slots.reset(new double[static_cast<size_t>(std::max<index_t>(chunk * slot_len0, 1))]);
    if (total) block_sums.resize(static_cast<size_t>(max_blocks * slot_len0));
    task_status.assign(static_cast<size_t>(chunk), TaskStatus{});
    starts.reserve(static_cast<size_t>(chunk + 1));
  } catch (const std::bad_alloc&) {
    status.code = ErrorCode::no_memory;
    return status;
  }
  if (total) std::fill(total, total + slot_len, 0.0);

  for (index_t start = 0; start < n_tasks; start += chunk) {
    const index_t count = std::min(chunk, n_tasks - start);
    starts.clear();
    for (index_t t = start; t < start + count;) {
      starts.push_back(t);
      t = std::min(start + count, std::max(t + 1, group_end(t)));
    }
    starts.push_back(start + count);
    const index_t n_groups = static_cast<index_t>(starts.size()) - 1;
    const index_t n_blocks = (count + kReduceBlock - 1) / kReduceBlock;
    const index_t n_ranges = (slot_len0 + kSumRange - 1) / kSumRange;
    double* const slot0 = slots.get();
    double* const bsum = total ? block_sums.data() : nullptr;
    for (index_t i = 0; i < count; ++i) task_status[static_cast<size_t>(i)] = TaskStatus{};
    // Groups handed out a few at a time: enough pieces to balance ragged
    // tasks across threads, few enough that dispatch stays cheap. Only the
    // work split depends on it, never a result.
#ifdef _OPENMP
    const index_t grain = std::max<index_t>(1, n_groups / (16 * static_cast<index_t>(threads)));
#pragma omp parallel num_threads(threads) default(none) \
    shared(make_worker, task_status, starts, start, n_groups, slot_len, grain, count, n_blocks, n_ranges, slot0, bsum)
#endif
    {
      // No exception may leave an OpenMP region: everything is caught here
      // and reported per task, then turned into one status after the join.
      bool have_worker = false;
      std::string why;
      ErrorCode why_code = ErrorCode::ok;
      decltype(make_worker()) *worker_ptr = nullptr;
      try {
        worker_ptr = new decltype(make_worker())(make_worker());
        have_worker = true;
      } catch (const std::bad_alloc&) {
        why_code = ErrorCode::no_memory;
      } catch (const std::exception& e) {
        why_code = ErrorCode::internal;
        why = e.what();
      }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, grain)
#endif
      for (index_t gi = 0; gi < n_groups; ++gi) {
        const index_t t0 = starts[static_cast<size_t>(gi)];
        const index_t g = starts[static_cast<size_t>(gi + 1)] - t0;
        TaskStatus& st = task_status[static_cast<size_t>(t0 - start)];
        std::fill(slot0 + (t0 - start) * slot_len, slot0 + (t0 - start + g) * slot_len, 0.0);
        if (!have_worker) {
          st.code = why_code;
          st.task = t0;
          st.message = why;
          continue;
        }
        try {
          (*worker_ptr)(t0, g, slot0 + (t0 - start) * slot_len, slot_len, &st);
        } catch (const std::bad_alloc&) {
          st.code = ErrorCode::no_memory;
          st.task = t0;
        } catch (const std::exception& e) {
          st.code = ErrorCode::internal;
          st.task = t0;
          st.message = e.what();
        }
      }
      delete worker_ptr;
      // Every slot is written (the loop above ends in a barrier): each block's
      // sum, its slots added in task order from 0.0. The work is split over
      // (block, entry range) pieces, so that a call with one block (W1: 32
      // tasks) still shares it between threads; every entry is still the same
      // in-order sum, so the split never changes a bit.
      if (bsum) {
        const index_t n_pieces = n_blocks * n_ranges;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (index_t p = 0; p < n_pieces; ++p) {
          const index_t b = p / n_ranges, k0 = (p % n_ranges) * kSumRange;
          const index_t k1 = std::min(slot_len, k0 + kSumRange);
          const index_t b0 = b * kReduceBlock, b1 = std::min(count, b0 + kReduceBlock);
          sum_slots(bsum + b * slot_len + k0, slot0 + b0 * slot_len + k0, slot_len, b1 - b0, k1 - k0);
        }
      }
    }
    for (index_t i = 0; i < count; ++i) {
      if (!task_status[static_cast<size_t>(i)].ok()) return task_status[static_cast<size_t>(i)];
    }
    if (total) {
      for (index_t b = 0; b < n_blocks; ++b) {
        const double* sum = bsum + b * slot_len;
        for (index_t k = 0; k < slot_len; ++k) total[k] += sum[k];
        if (blocks_out) {
          // Block partials, for a caller that combines shards itself (Dask):
          // summing them in order from 0.0 reproduces `total` bitwise.
          std::copy(sum, sum + slot_len, blocks_out + ((start / kReduceBlock) + b) * slot_len);
        }
      }
    }
  }
  return status;
}

// A per-task worker (ErrorCode operator()(index_t t, double* slot,
// index_t* step)) as a group worker.
// Runs a one-task worker on each task of the group t0 .. t0+g-1, recording
// any failure (code, task, step) in that task's status.
template <class Worker>
inline void each_task(Worker& w, index_t t0, index_t g, double* slots, index_t slot_len, TaskStatus* status) {
  for (index_t l = 0; l < g; ++l) {
    index_t step = -1;
    const ErrorCode code = w(t0 + l, slots + l * slot_len, &step);
    if (code != ErrorCode::ok) {
      status[l].code = code;
      status[l].task = t0 + l;
      status[l].step = step;
    }
  }
}

template <class Worker>
struct PerTask {
  Worker w;
  void operator()(index_t t0, index_t g, double* slots, index_t slot_len, TaskStatus* status) {
    each_task(w, t0, g, slots, slot_len, status);
  }
};

// Runs `Worker` over tasks [0, n_tasks), one task at a time: run_groups with
// groups of one. `make_worker()` is called once per thread and returns an
// object with
//     ErrorCode operator()(index_t t, double* slot, index_t* step)
// which writes `slot_len` doubles of task t's result into `slot`.
template <class MakeWorker>
TaskStatus run_tasks(index_t n_tasks, index_t slot_len, int n_threads, MakeWorker&& make_worker, double* total,
                     double work_per_task = 1e9, double* blocks_out = nullptr) {
  auto make = [&]() { return PerTask<decltype(make_worker())>{make_worker()}; };
  return run_groups(n_tasks, slot_len, n_threads, [](index_t t) { return t + 1; }, make, total, work_per_task,
                    blocks_out);
}

}  // namespace fastmaml
