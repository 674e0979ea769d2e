"""The Triton kernels of the Bi-WKV (see `triton_op.py`, which imports this module on first use only)."""

try:  # imported only through triton_op, after it checked for triton (a try block for transformers' import check)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton Bi-WKV needs triton") from error


@triton.jit
def shifted_log_decay(w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, shift, BLOCK_T: tl.constexpr):
    """Row t: the log-decay of token t0 + t + shift, zero outside the chunk and past the end."""
    ts = t0 + o_t + shift
    mask = ((o_t + shift >= 0) & (o_t + shift < BLOCK_T) & (ts < T))[:, None] & m_n[None, :]
    w = tl.load(w_ptr + base + ts[:, None] * stride_t + o_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, -tl.exp(tl.minimum(w, 80.0)), 0.0)


@triton.jit
def log_decays(w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, BLOCK_T: tl.constexpr):
    """Log-decays of the token before and of the token after each token of the chunk starting at t0 (zero
    across the chunk edges and past the end), and the decays from the chunk start to just before each token,
    from just after it to the chunk end, and over the whole chunk: sums over the tokens in between only."""
    ld_prev = shifted_log_decay(w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, -1, BLOCK_T)
    ld = shifted_log_decay(w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, 0, BLOCK_T)
    ld_next = shifted_log_decay(w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, 1, BLOCK_T)
    to_start = tl.exp(tl.cumsum(ld_prev, axis=0))
    to_end = tl.exp(tl.cumsum(ld_next, axis=0, reverse=True))
    chunk_decay = tl.exp(tl.sum(ld, axis=0))
    return ld_prev, ld_next, to_start, to_end, chunk_decay


@triton.jit
def pair_decay(ld_prev, ld_next, o_t, i):
    """exp(sum of the log-decays strictly between token t (rows) and token i of the chunk), t != i: a sum
    over exactly the tokens in between (left of i: a reverse cumulative sum, right of i: a forward one)."""
    right = tl.cumsum(tl.where(o_t[:, None] >= i + 2, ld_prev, 0.0), axis=0)
    left = tl.cumsum(tl.where(o_t[:, None] <= i - 2, ld_next, 0.0), axis=0, reverse=True)
    return tl.exp(tl.where(o_t[:, None] > i, right, left))


@triton.jit
def forward_kernel(
    r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, T, H, N,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    stride_t = H * N
    base = i_b.to(tl.int64) * T * stride_t + i_h * N
    o_t = tl.arange(0, BLOCK_T)
    o_n = tl.arange(0, BLOCK_N)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n, m_v = o_n < N, o_v < N
    u = tl.load(u_ptr + i_h * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(T, BLOCK_T)

    # left to right: the chunk itself and the state of the chunks before it
    state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c in range(num_chunks):
        t0 = c * BLOCK_T
        tt = t0 + o_t
        m_t = tt < T
        p_n = base + tt[:, None] * stride_t + o_n[None, :]
        p_v = base + tt[:, None] * stride_t + o_v[None, :]
        m_tn, m_tv = m_t[:, None] & m_n[None, :], m_t[:, None] & m_v[None, :]
        r = tl.load(r_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        ld_prev, ld_next, to_start, to_end, chunk_decay = log_decays(
            w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, BLOCK_T
        )
        scores = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for i in range(BLOCK_T):
            k_i = tl.load(k_ptr + base + (t0 + i) * stride_t + o_n, mask=m_n & (t0 + i + 0 * o_n < T), other=0.0)
            decay = tl.where(o_t[:, None] == i, u[None, :], pair_decay(ld_prev, ld_next, o_t, i))
            column = tl.sum(r * decay * k_i.to(tl.float32)[None, :], axis=1)
            scores += tl.where(o_t[None, :] == i, column[:, None], 0.0)
        y = tl.dot(scores, v, input_precision="ieee")
        y += tl.dot(r * to_start, state, input_precision="ieee")
        tl.store(y_ptr + p_v, y, mask=m_tv)
        state = chunk_decay[:, None] * state + tl.dot(tl.trans(k * to_end), v, input_precision="ieee")

    tl.debug_barrier()  # the right-to-left pass reads what this program stored
    # right to left: the state of the chunks after each chunk
    state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c_rev in range(num_chunks):
        t0 = (num_chunks - 1 - c_rev) * BLOCK_T
        tt = t0 + o_t
        m_t = tt < T
        p_n = base + tt[:, None] * stride_t + o_n[None, :]
        p_v = base + tt[:, None] * stride_t + o_v[None, :]
        m_tn, m_tv = m_t[:, None] & m_n[None, :], m_t[:, None] & m_v[None, :]
        r = tl.load(r_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        ld_prev, ld_next, to_start, to_end, chunk_decay = log_decays(
            w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, BLOCK_T
        )
        y = tl.load(y_ptr + p_v, mask=m_tv, other=0.0)
        y += tl.dot(r * to_end, state, input_precision="ieee")
        tl.store(y_ptr + p_v, y, mask=m_tv)
        state = chunk_decay[:, None] * state + tl.dot(tl.trans(k * to_start), v, input_precision="ieee")


@triton.jit
def backward_kernel(
    r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, dy_ptr, dr_ptr, dk_ptr, dld_ptr, saved_ptr, T, H, N,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """dr, dk and the gradient of the log-decays, for one block of value channels (summed outside)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    num_v = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    stride_t = H * N
    base = i_b.to(tl.int64) * T * stride_t + i_h * N
    # this block's slice of the (num_v, B, T, H, N) partial gradients
    out_base = i_v.to(tl.int64) * (tl.num_programs(1) // H) * T * stride_t
    o_t = tl.arange(0, BLOCK_T)
    o_n = tl.arange(0, BLOCK_N)
    o_w = tl.arange(0, BLOCK_V)
    o_v = i_v * BLOCK_V + o_w
    m_n, m_v = o_n < N, o_v < N
    u = tl.load(u_ptr + i_h * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    num_chunks = tl.cdiv(T, BLOCK_T)
    # per chunk, two (BLOCK_N, BLOCK_V) matrices the second pass needs from the first
    saved_base = (i_bh.to(tl.int64) * num_v + i_v) * num_chunks * 2 * BLOCK_N * BLOCK_V
    p_saved = o_n[:, None] * BLOCK_V + o_w[None, :]
    # 0/1 matrices that move row j + 1 (resp. j - 1) to row j: exact in a matmul
    from_next = (o_t[None, :] == o_t[:, None] + 1).to(tl.float32)
    from_prev = (o_t[None, :] == o_t[:, None] - 1).to(tl.float32)

    # Left to right. state: the forward state entering chunk c (from the chunks before it); grad_state: the
    # gradient of the backward state of chunk c - 1 (through the chunks before c), which holds the tokens
    # from c on: both reach chunk c from the left.
    state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    grad_state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c in range(num_chunks):
        t0 = c * BLOCK_T
        tt = t0 + o_t
        m_t = tt < T
        p_n = base + tt[:, None] * stride_t + o_n[None, :]
        p_v = base + tt[:, None] * stride_t + o_v[None, :]
        m_tn, m_tv = m_t[:, None] & m_n[None, :], m_t[:, None] & m_v[None, :]
        r = tl.load(r_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        ld_prev, ld_next, to_start, to_end, chunk_decay = log_decays(
            w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, BLOCK_T
        )
        p_c = saved_ptr + saved_base + c * 2 * BLOCK_N * BLOCK_V + p_saved
        tl.store(p_c, state)
        tl.store(p_c + BLOCK_N * BLOCK_V, grad_state)

        dr = to_start * tl.dot(dy, tl.trans(state), input_precision="ieee")
        dk = to_start * tl.dot(v, tl.trans(grad_state), input_precision="ieee")
        # the decay from the chunk start to token t spans the tokens j < t: d(log-decay_j) gets the
        # contributions of every t > j (a reverse cumulative sum, read at row j + 1)
        after = tl.cumsum(r * dr + k * dk, axis=0, reverse=True)
        before = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        # inside the chunk: token pairs (t, i), one column i at a time
        for i in range(BLOCK_T):
            m_i = t0 + i + 0 * o_n < T  # a tensor, also where the interpreter has plain ints
            p_i = base + (t0 + i) * stride_t
            k_i = tl.load(k_ptr + p_i + o_n, mask=m_n & m_i, other=0.0).to(tl.float32)
            v_i = tl.load(v_ptr + p_i + o_v, mask=m_v & (t0 + i + 0 * o_v < T), other=0.0).to(tl.float32)
            decay = pair_decay(ld_prev, ld_next, o_t, i)
            g = tl.sum(dy * v_i[None, :], axis=1)  # dy_t . v_i
            decay_u = tl.where(o_t[:, None] == i, u[None, :], decay)
            dr += g[:, None] * decay_u * k_i[None, :]
            dk_i = tl.sum(g[:, None] * decay_u * r, axis=0)
            dk += tl.where(o_t[:, None] == i, dk_i[None, :], 0.0)
            # contribution of the pair (t, i) to every log-decay strictly between t and i
            pair = tl.where(o_t[:, None] == i, 0.0, r * decay * k_i[None, :] * g[:, None])
            after_i = tl.cumsum(tl.where(o_t[:, None] > i, pair, 0.0), axis=0, reverse=True)
            after += tl.where(o_t[:, None] >= i + 2, after_i, 0.0)
            before_i = tl.cumsum(tl.where(o_t[:, None] < i, pair, 0.0), axis=0)
            before += tl.where(o_t[:, None] <= i - 2, before_i, 0.0)
        dld = tl.dot(from_next, after, input_precision="ieee") + tl.dot(from_prev, before, input_precision="ieee")
        tl.store(dr_ptr + out_base + p_n, dr, mask=m_tn)
        tl.store(dk_ptr + out_base + p_n, dk, mask=m_tn)
        tl.store(dld_ptr + out_base + p_n, dld, mask=m_tn)
        state = chunk_decay[:, None] * state + tl.dot(tl.trans(k * to_end), v, input_precision="ieee")
        grad_state = chunk_decay[:, None] * grad_state + tl.dot(tl.trans(r * to_end), dy, input_precision="ieee")

    tl.debug_barrier()  # the right-to-left pass reads what this program stored
    # Right to left, the mirror image: state is the backward state of chunk c, grad_state the gradient of
    # the forward state entering chunk c + 1.
    state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    grad_state = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c_rev in range(num_chunks):
        c = num_chunks - 1 - c_rev
        t0 = c * BLOCK_T
        tt = t0 + o_t
        m_t = tt < T
        p_n = base + tt[:, None] * stride_t + o_n[None, :]
        p_v = base + tt[:, None] * stride_t + o_v[None, :]
        m_tn, m_tv = m_t[:, None] & m_n[None, :], m_t[:, None] & m_v[None, :]
        r = tl.load(r_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + p_n, mask=m_tn, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + p_v, mask=m_tv, other=0.0).to(tl.float32)
        ld_prev, ld_next, to_start, to_end, chunk_decay = log_decays(
            w_ptr, base, t0, T, stride_t, o_t, o_n, m_n, BLOCK_T
        )
        dr = to_end * tl.dot(dy, tl.trans(state), input_precision="ieee")
        dk = to_end * tl.dot(v, tl.trans(grad_state), input_precision="ieee")
        # the decay from token t to the chunk end spans the tokens j > t: row j - 1 of a cumulative sum
        before = tl.cumsum(r * dr + k * dk, axis=0)
        dld = tl.dot(from_prev, before, input_precision="ieee")
        # the decay of the whole chunk, crossed by every pair with one token on each side
        p_c = saved_ptr + saved_base + c * 2 * BLOCK_N * BLOCK_V + p_saved
        forward_state = tl.load(p_c)
        grad_backward_state = tl.load(p_c + BLOCK_N * BLOCK_V)
        grad_chunk = tl.sum(grad_state * forward_state, axis=1) + tl.sum(grad_backward_state * state, axis=1)
        dld += (grad_chunk * chunk_decay)[None, :]
        p_out = out_base + p_n
        tl.store(dr_ptr + p_out, tl.load(dr_ptr + p_out, mask=m_tn, other=0.0) + dr, mask=m_tn)
        tl.store(dk_ptr + p_out, tl.load(dk_ptr + p_out, mask=m_tn, other=0.0) + dk, mask=m_tn)
        tl.store(dld_ptr + p_out, tl.load(dld_ptr + p_out, mask=m_tn, other=0.0) + dld, mask=m_tn)
        state = chunk_decay[:, None] * state + tl.dot(tl.trans(k * to_start), v, input_precision="ieee")
        grad_state = chunk_decay[:, None] * grad_state + tl.dot(tl.trans(r * to_start), dy, input_precision="ieee")
