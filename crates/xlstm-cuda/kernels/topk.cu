// topk.cu — the fused LM head's selection: for each row of logits, the k largest in the order of the
// host's `top_k_of` (values by IEEE total order, ties to the lower index), so that only k (id, value)
// pairs per row come back to the host instead of the whole vocabulary.
//
// topk_rows: grid = rows, block = 1024. Each value becomes a 64-bit key (total-order bits, then the
// inverted index); k rounds each take the block-wide largest key below the previous round's. Exact
// for any k ≤ V; a round costs one pass over the row (V/1024 values per thread, 8 loads in flight)
// and one reduction.
// Writes ids[row·k + j], vals[row·k + j] (the value's bits as stored).

extern "C" __global__ void __launch_bounds__(1024) topk_rows(const float* x, int V, int k, u32* ids, float* vals) {
    __shared__ unsigned long long red[32];
    const float* row = x + (long long)blockIdx.x * V;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    unsigned long long bound = ~0ull;
    for (int j = 0; j < k; ++j) {
        unsigned long long best = 0;
        // 8 loads in flight per thread (one at a time, the pass is a chain of memory latencies)
        int i = threadIdx.x;
        for (; i + 7 * (int)blockDim.x < V; i += 8 * blockDim.x) {
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) v[u] = row[i + u * blockDim.x];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const unsigned long long key = order_key(v[u], (u32)(i + u * blockDim.x));
                if (key < bound && key > best) best = key;
            }
        }
        for (; i < V; i += blockDim.x) {
            const unsigned long long key = order_key(row[i], (u32)i);
            if (key < bound && key > best) best = key;
        }
        best = warp_max_u64(best);
        __syncthreads();  // red is free again
        if (lane == 0) red[w] = best;
        __syncthreads();
        best = warp_max_u64(lane < nw ? red[lane] : 0ull);
        if (threadIdx.x == 0) {
            const u32 i = key_index(best);
            ids[(long long)blockIdx.x * k + j] = i;
            vals[(long long)blockIdx.x * k + j] = row[i];
        }
        bound = best;
    }
}
