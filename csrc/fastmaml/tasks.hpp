// Views of a meta-batch: dense (T, n, d) arrays or rows gathered by index
// from one shared dataset, possibly ragged (offsets per task).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.hpp"

namespace fastmaml {

// One side (support or query) of every task in a meta-batch.
//
// Task t owns the positions [ptr[t], ptr[t+1]). Position p has label y[p]
// and features at row  base + (idx ? idx[p] : p) * d. Dense batches pass
// idx = nullptr and ptr = t * n; index-form batches share one base (the
// dataset) between support and query and gather rows through idx, so an
// episode is never copied.
template <class T>
struct SideView {
  const T* base = nullptr;
  const index_t* idx = nullptr;  // nullable: identity
  const index_t* ptr = nullptr;  // length n_tasks + 1
  const std::int32_t* y = nullptr;

  index_t begin(index_t t) const { return ptr[t]; }
  index_t size(index_t t) const { return ptr[t + 1] - ptr[t]; }
  const T* row(index_t p, index_t d) const {
    return base + (idx ? idx[p] : p) * d;
  }
  // Fill `rows` with the row pointers of task t; returns the row count.
  index_t gather(index_t t, index_t d, std::vector<const T*>& rows) const {
    const index_t b = begin(t), n = size(t);
    rows.resize(static_cast<size_t>(n));
    for (index_t i = 0; i < n; ++i) rows[i] = row(b + i, d);
    return n;
  }
};

template <class T>
struct TaskSet {
  index_t n_tasks = 0;
  index_t d = 0;  // features; parameters are d + 1 (bias last)
  SideView<T> support;
  SideView<T> query;
  // Optional kernel matrix of the shared dataset, X X^T (n_rows x n_rows, the
  // weight columns only): an index-form episode's Gram matrix is then
  // gathered from it instead of computed (docs/design.md section 3).
  const T* kernel = nullptr;
  index_t kernel_rows = 0;
};

}  // namespace fastmaml
