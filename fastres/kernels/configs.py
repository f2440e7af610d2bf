"""Autotuning candidates for fastres's Triton kernels, as data.

Each kernel class has a table of :class:`KernelConfig` rows. :func:`prune` drops the rows that
cannot fit (shared memory, registers) or that waste most of a tile on a small layer; the tuner
in :mod:`fastres.kernels.conv` times what is left, once per shape key. Every row here compiles
for sm_90 without spills and uses wgmma and 16-byte async copies — ``python -m
fastres.compile_report`` checks that and a row that fails it is removed from this file.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace

from fastres._env import switched_off

# H100: 227 KiB of shared memory per block (opt-in maximum).
SMEM_LIMIT = 232448
# H100 SXM's multiprocessors (H200: also 132): the persistent rows' pruning without a GPU.
SMS = 132


def _triton_at_least(major: int, minor: int) -> bool:
    try:
        import triton
    except ImportError:  # (the tables are data; nothing launches without Triton)
        return False
    from fastres.ops._backend import _leading_ints

    return _leading_ints(getattr(triton, "__version__", "")) >= (major, minor)


# Triton pipelines the persistent rows' flattened tile-and-K loop of pointer loads (async
# copies, wgmma overlapped) from 3.8; 3.6 (the compile report under it: synchronous loads, 24-32
# KiB of shared memory) does not, so the pointer persistent rows are offered from 3.8 only.
# Their TMA twins are pipelined by both.
POINTER_PERSISTENT = _triton_at_least(3, 8)


def _tma_rows() -> bool:
    if switched_off("FASTRES_TMA"):
        return False
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


# ``FASTRES_TMA=0`` (or false/off/no; read when this module is imported): no TMA row is
# offered, and a remembered one runs without TMA (the rows' way out, should a GPU or driver
# mishandle the descriptors). Also off with a Triton that cannot make descriptors on the
# device or take an allocator for their scratch.
TMA_ROWS = _tma_rows()

# fp32 accumulator registers per thread we allow (the rest of the 255 go to addresses,
# masks and the epilogue); BLOCK_M * BLOCK_N / (32 * num_warps) above this spills.
ACC_REGS_LIMIT = 128


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of the implicit-GEMM convolution kernel.

    ``block_k`` is the channel block of one K step. In block-diagonal grouped mode it is the
    number of input channels one program packs (``groups_per_block * C_in/groups``).
    ``early_res``: load the residual tile before the K loop rather than in the epilogue (a
    layer with a residual only), so that its read overlaps the operand loads: for
    memory-bound 1x1 layers with few K steps, where a program otherwise waits for memory
    twice. Its label ends in ``r``.
    ``persistent`` (1x1 stride-1 GEMMs only): 0 launches one program per output tile; ``p``
    launches ``p`` programs per SM (at most one per tile), each looping over tiles with the
    tile and K loops flattened into one pipelined loop, so that a tile's epilogue overlaps
    the next tile's operand loads. Its label ends in ``p`` and the count.
    ``tma`` (1x1 stride-1 GEMMs, 16-bit, channel counts that are multiples of 8): the
    activation, weight and residual tiles are loaded, and the output tile stored, by Hopper's
    tensor memory accelerator through tensor descriptors (no address or mask arithmetic in the
    kernel; the output goes through shared memory). A call whose tensors are not 16-byte
    aligned runs the same row without it. Its label ends in ``t``.
    ``box_h`` (TMA rows of the implicit-GEMM schedule: ungrouped convolutions whose strides
    divide the input's size, such as ResNet's 3x3 layers and its 3x3/2 and 1x1/2 layers at
    even sizes): the output tile is a ``box_h`` x ``block_m // box_h`` block of one image's
    output pixels rather than ``block_m`` consecutive pixels, and each K step's activation
    tile is one box of the NHWC input at the tap's offset (for a stride, of the input seen
    as ``[N, H/sh, sh, W/sw, sw*C]``), loaded by TMA, which fills the padding halo
    (coordinates before or past the image) with zeros: no address or mask arithmetic.
    Offered where those blocks cover the output with at most a quarter of the computed
    pixels wasted. Its label ends in ``t`` and the block (``t8x16``).
    ``box_n`` (block rows only; 1 by default): the block spans ``box_n`` consecutive images,
    ``box_n`` x ``box_h`` x ``block_m // (box_n * box_h)`` pixels, one box of ``box_n``
    images per tap: a small output (7x7) then fills a wide tile. Its label gives the images
    first (``t2x8x8``).
    ``split_k`` (1x1 GEMMs and implicit-GEMM convolutions; 0 or 1: none): the K loop is cut
    into ``split_k`` ranges, each run by programs of its own (grid axis 2) that write fp32
    partial sums to a workspace; a second kernel adds them in order, then the bias, the
    residual and the ReLU (:func:`fastres.kernels.conv.split_k_epilogue_kernel`). For layers
    whose output has fewer tiles than the GPU has SMs and a long K loop (at batch 1, most of
    ResNet's layers from layer1's 3x3 on; layer3 and layer4 there: 8 to 16 programs of 36 to
    72 K steps each; and the head's linear layer). Its label ends in ``k``
    and the count.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    early_res: bool = False
    persistent: int = 0
    tma: bool = False
    split_k: int = 0
    box_h: int = 0
    box_n: int = 1

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def box_w(self) -> int:
        """A block row's block width (``block_m // (box_n * box_h)``)."""
        return self.block_m // (self.box_n * self.box_h)

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
                f"w{self.num_warps} s{self.num_stages}" + (" r" if self.early_res else "")
                + (f" p{self.persistent}" if self.persistent else "")
                + ((f" t{self.box_n}x" if self.box_n > 1 else " t")
                   + f"{self.box_h}x{self.box_w}" if self.box_h
                   else " t" if self.tma else "")
                + (f" k{self.split_k}" if self.split_k > 1 else ""))


C = KernelConfig

# Split-K rows, in the GEMM and implicit-GEMM tables: for layers with fewer output tiles than
# the GPU has SMs and a long K loop (offered by _prune only there): at batch 1 most of ResNet's
# layers from layer1's 3x3 on (layer3/layer4 run 8 to 16 programs of 36 to 72 K steps on 132
# SMs otherwise), and the head's linear layer at batches up to 512.
SPLIT_K_ROWS = [
    C(64, 64, 64, 8, 4, 4, split_k=2),
    C(64, 64, 64, 8, 4, 4, split_k=4),
    C(64, 64, 64, 8, 4, 4, split_k=8),
    C(64, 64, 64, 8, 4, 4, split_k=16),
    C(64, 128, 64, 8, 4, 4, split_k=4),
    C(64, 128, 64, 8, 4, 4, split_k=8),
]

# 1x1 stride-1 convolutions are plain GEMMs [N*H*W, C_in] x [C_in, C_out]: large tiles, deep
# pipelining, 8 warps (the wrong-results report pytorch#173068 concerns non-1x1 templates).
GEMM_CONFIGS = [
    C(128, 256, 64, 8, 8, 3),
    C(128, 128, 64, 8, 8, 4),
    # 3 stages: 96 KiB of shared memory, so two programs fit an SM where their registers do
    # (<= 128 per thread; the 4-stage row's 128 KiB fits one): for the long-K layers with few
    # tiles (layer4.1.conv1 at batch 256: 392 tiles of 128x128 on 132 SMs, 0.81x cuDNN's
    # convolution + epilogue with the 4-stage row)
    C(128, 128, 64, 8, 8, 3),
    C(128, 128, 64, 8, 4, 3),
    C(128, 64, 64, 8, 4, 4),
    C(64, 128, 64, 8, 4, 4),
    C(64, 64, 64, 8, 4, 4),
    C(256, 64, 64, 8, 8, 3),  # 64 output channels (layer1's 1x1 layers): as in CONV_CONFIGS
    # the residual read before the K loop (offered for 16-bit layers with a residual only:
    # ResNet's bottleneck conv3, memory-bound at 81-292 TFLOP/s in the 2026-12-04 run). Its
    # tile is live through the K loop: 20-45 more registers per thread (64x64: 72 -> 96,
    # seven programs per SM -> five), so whether it pays is for the tuner to measure.
    C(128, 128, 64, 8, 8, 3, early_res=True),
    C(128, 64, 64, 8, 4, 4, early_res=True),
    C(64, 128, 64, 8, 4, 4, early_res=True),
    C(64, 64, 64, 8, 4, 4, early_res=True),
    # persistent programs (one or two per SM, looping over tiles; the pipeline depth is
    # kept: the flattened loop is long however few K steps a tile has). For the memory-bound
    # layers whose programs are short (one to four K steps), where each program waits for
    # its operands, then for its residual, then stores. Offered when every program gets at
    # least two tiles. (Compile report, sm_90, 16-bit: 128x128 with 8 warps takes 187
    # registers per thread and 128 KiB, one program per SM; the 4-warp rows 148-194
    # registers and 104 KiB, two.)
    C(128, 128, 64, 8, 8, 3, persistent=1),
    C(128, 64, 64, 8, 4, 4, persistent=2),
    C(64, 128, 64, 8, 4, 4, persistent=2),
    # TMA rows (Hopper's tensor memory accelerator moves every tile; Triton's Hopper matmul
    # tutorials use it for their fastest schedules): offered for 16-bit layers whose channel
    # counts are multiples of 8 (16-byte rows). One program per tile, and persistent.
    C(128, 128, 64, 8, 8, 3, tma=True),
    C(128, 64, 64, 8, 4, 4, tma=True),
    C(128, 128, 64, 8, 8, 3, persistent=1, tma=True),
    C(128, 64, 64, 8, 4, 4, persistent=2, tma=True),
    *SPLIT_K_ROWS,
]

# Implicit GEMM (3x3, strided 1x1, dilated). The first row (the pinned choice) has 4 warps:
# inductor caps non-1x1 conv templates at 4 warps because 8 warps gave wrong results
# (pytorch#173068). The 8-warp rows (two warpgroups: the wide tiles Hopper's wgmma wants; the
# layer3/layer4 3x3 layers ran at ~400 TFLOP/s against cuDNN's 660-745 with 4 warps) are
# candidates only: the tuner checks each candidate's output against the torch reference on
# the layer's own shape before timing it, and tests/test_triton_conv.py's
# test_gpu_every_config runs every row against F.conv2d on a GPU.
CONV_CONFIGS = [
    C(128, 128, 64, 8, 4, 3),
    C(128, 64, 64, 8, 4, 4),
    C(64, 128, 64, 8, 4, 4),
    C(64, 64, 64, 8, 4, 4),
    C(128, 128, 32, 8, 4, 4),
    # 32 channels per group (ResNeXt layer3/4: 32x4d, 64x4d, 32x8d): N and K tiles of 32
    C(128, 32, 32, 8, 4, 4),
    C(64, 32, 32, 8, 4, 4),
    # 8 warps
    C(128, 256, 64, 8, 8, 3),
    C(256, 128, 64, 8, 8, 3),
    C(128, 128, 64, 8, 8, 4),
    # K steps of 128 channels (layers with C_in/groups >= 128): half the loop iterations and
    # twice the work per wgmma wait; inductor offers 128x128x128 with 8 warps, 2-3 stages
    C(128, 128, 128, 8, 8, 2),
    C(128, 128, 128, 8, 8, 3),
    # layers with 64 output channels (ResNet layer1's 3x3): the 4-warp rows give them
    # 128x64 or 64x64 tiles (the 3x3 ran at 260 TFLOP/s at batch 256, cuDNN's convolution
    # at 462); two warpgroups on a 256-row tile. Offered for such narrow layers only.
    C(256, 64, 64, 8, 8, 3),
    # TMA rows (ungrouped, strides dividing the input, 16-bit, channel counts multiples of
    # 8): the output tile is a block of box_h x block_m/box_h pixels of one image, each K
    # step's activation tile a box at the tap's offset whose halo TMA fills with zeros
    # (:func:`fastres.kernels.conv._conv_tma`). 8x16 blocks cover 56x56 outputs with 12.5%
    # of the computed pixels wasted, 28x28 and 14x14 with 23%; 8x8 blocks cover 56x56 exactly,
    # 28x28, 14x14 and 7x7 with 23%; 16x16 blocks cover 56x56, 28x28 and 14x14 with 23%. The kernel
    # computes the transposed product, so wgmma reads the box from shared memory, reshaped
    # there (the compile report checks the TMA loads, and wgmma's operands in shared memory).
    C(128, 128, 64, 8, 4, 3, tma=True, box_h=8),
    C(128, 64, 64, 8, 4, 4, tma=True, box_h=8),
    C(64, 128, 64, 8, 4, 4, tma=True, box_h=8),
    C(128, 256, 64, 8, 8, 3, tma=True, box_h=8),
    C(256, 128, 64, 8, 8, 3, tma=True, box_h=16),
    C(256, 64, 64, 8, 8, 3, tma=True, box_h=16),
    # blocks of 8x8 pixels in 2 or 4 consecutive images: 128- and 256-pixel tiles (wgmma
    # n128 / n256) for 7x7 outputs (ResNet layer4, 23% wasted), where a block of one image
    # has 64 pixels at most; 56x56 outputs are whole 8x8 blocks (none wasted), 28x28 and
    # 14x14 waste 23%. Not at batch 1 (half the block would be the missing second image).
    C(128, 128, 64, 8, 4, 3, tma=True, box_h=8, box_n=2),
    C(256, 128, 64, 8, 8, 3, tma=True, box_h=8, box_n=4),
    # one output row of 64 pixels (56-wide outputs: ResNet layer1's 3x3, 12.5% wasted)
    C(64, 64, 64, 8, 4, 4, tma=True, box_h=1),
    *SPLIT_K_ROWS,
]

# Grouped convolutions with few channels per group (ResNeXt): block-diagonal packing, one
# program covers block_k input channels (several groups) and the matching output channels.
GROUPED_CONFIGS = [
    C(128, 64, 64, 8, 4, 3),
    C(64, 64, 64, 8, 4, 4),
    C(128, 32, 32, 8, 4, 4),
    C(64, 32, 32, 8, 4, 4),
]

# The stem (7x7/2, C_in = 3): K per kernel row = S * C_in (21), padded to the next power of two
# (the launcher sets block_k from the shape; the column here is nominal).
# Removed by the compile report: C(256, 64, 32, 8, 4, 3) (255 registers, 144-byte stack spill:
# the per-element tap masks of a 256-row activation tile).
STEM_CONFIGS = [
    C(128, 64, 32, 8, 4, 3),
    C(64, 64, 32, 8, 4, 4),
]

# Under the Triton interpreter (it cannot benchmark) one configuration runs per problem,
# without timing: :func:`interpreter_config`, tiles up to 64 wide (the interpreter's cost is
# per block operation, so whole-model tests need large tiles). INTERPRETER_CONFIG is the small
# one tests pass explicitly to cover several blocks and the masks on small shapes.
INTERPRETER_CONFIG = C(32, 32, 16, 4, 4, 1)

TABLES = {
    "gemm": GEMM_CONFIGS,
    "conv": CONV_CONFIGS,
    "grouped": GROUPED_CONFIGS,
    "stem": STEM_CONFIGS,
}


def tables_digest() -> str:
    """Twelve hex digits naming the candidate tables (every row of every schedule): the
    tuning cache is kept per digest, since a choice made among other candidates may not be
    the fastest of these. The switches that decide which rows are offered (``FASTRES_TMA``,
    the pointer persistent rows' Triton version) are part of it: a choice made with the TMA
    rows off was made without them."""
    text = repr((sorted((kind, [repr(c) for c in rows]) for kind, rows in TABLES.items()),
                 {"tma": TMA_ROWS, "pointer_persistent": POINTER_PERSISTENT}))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _pow2_at_least(v: int, lo: int = 16) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


def interpreter_config(m: int, n_per_group: int, k_per_group: int) -> KernelConfig:
    """The single configuration used under the interpreter for this problem size."""
    return KernelConfig(min(64, _pow2_at_least(m)), min(64, _pow2_at_least(n_per_group)),
                        min(64, _pow2_at_least(k_per_group)), 4, 4, 1)


def smem_bytes(cfg: KernelConfig, elem_bytes: int, has_res: bool = False) -> int:
    """Shared memory of the pipelined A and B tiles (the estimate inductor prunes with), and
    for a TMA row the output tile it stores from (and the residual tile it loads into)."""
    tiles = (cfg.block_m + cfg.block_n) * cfg.block_k * elem_bytes * cfg.num_stages
    if cfg.tma:
        tiles += cfg.block_m * cfg.block_n * elem_bytes * (2 if has_res else 1)
    return tiles


def k_steps(cfg: KernelConfig, kind: str, k_per_group: int, taps: int) -> int:
    """Iterations of the kernel's K loop: ``taps`` kernel positions (R*S; kernel rows for the
    stem) times the channel blocks of one position (one for the stem and block-diagonal
    grouped schedules, whose block covers the whole K step)."""
    if kind in ("stem", "grouped"):
        return taps
    return taps * -(-k_per_group // cfg.block_k)


def trim_stages(cfg: KernelConfig, steps: int) -> KernelConfig:
    """``cfg`` with at most ``steps + 1`` pipeline stages (but not below 2, and never more
    than the row has).

    Triton's pipeliner keeps ``num_stages - 1`` K steps in flight and allocates shared memory
    for all stages whether or not the loop has that many iterations. (A persistent row is
    kept whole: its flattened loop runs every tile's K steps.) A layer with one or two
    K steps (1x1 convolutions from 64 or 128 channels at block_k 64: ResNet layer1/layer2)
    gains nothing from deeper pipelining, while the unused stages halve how many programs fit
    on an SM (128x128x64, 4 stages, 16-bit: 128 KiB, one program per SM; 2 stages: 64 KiB).
    Those layers are memory-bound, and more resident programs overlap one tile's loads with
    another's epilogue.
    """
    if cfg.persistent:
        return cfg
    stages = min(cfg.num_stages, max(2, steps + 1))  # never deeper than the table's row
    return cfg if stages == cfg.num_stages else replace(cfg, num_stages=stages)


def prune(table: list[KernelConfig], kind: str, m: int, n_per_group: int, k_per_group: int,
          elem_bytes: int, has_res: bool = False, *, taps: int,
          smem_limit: int = SMEM_LIMIT, sms: int = SMS, groups: int = 1,
          box: tuple[int, int] | None = None) -> list[KernelConfig]:
    """The rows of ``table`` worth trying for this problem (never empty), each with its
    pipeline depth trimmed to the K loop's length (:func:`trim_stages`).

    ``m``: output pixels N*P*Q; ``n_per_group``: output channels per group; ``k_per_group``:
    the channel extent of one K step (C_in/groups, or S*C_in for the stem); ``has_res``: the
    epilogue reads a residual tile; ``taps``: kernel positions the K loop visits (R*S, or R
    for the stem; required: a wrong count trims a 3x3 layer's pipeline). Shared memory is
    checked at the row's full depth, before trimming (conservative), against
    ``smem_limit`` bytes (default H100's; the launcher passes the GPU's own opt-in maximum,
    smaller on A100 and on consumer GPUs); ``sms``: the GPU's multiprocessors (default
    H100 SXM's), for the persistent and split-K rows; ``groups``: the kernel's groups (its
    programs are tiles x groups), for the split-K rows; ``box``: the output's (height,
    width) when the layer's activation boxes can be loaded by TMA (an implicit-GEMM
    convolution with one group whose strides divide its input's size,
    :func:`fastres.kernels.conv.tma_box`), for the implicit-GEMM TMA rows; ``None``: none
    of them.
    """
    return list(dict.fromkeys(
        trim_stages(cfg, k_steps(cfg, kind, k_per_group, taps))
        for cfg in _prune(table, kind, m, n_per_group, k_per_group, elem_bytes, has_res,
                          smem_limit, sms, taps, groups, box)))


def box_blocks(cfg: KernelConfig, box: tuple[int, int]) -> tuple[int, int]:
    """How many of ``cfg``'s output blocks (``box_h`` x ``box_w`` pixels of each of its
    ``box_n`` images) cover a ``box`` = (height, width) output: (block rows, block
    columns)."""
    p, q = box
    return -(-p // cfg.box_h), -(-q // cfg.box_w)


def box_waste_ok(cfg: KernelConfig, box: tuple[int, int], images: int = 1) -> bool:
    """Whether ``cfg``'s output blocks cover ``images`` outputs of ``box`` = (height, width)
    with at most a quarter of the computed pixels wasted (a block of ``box_n`` images
    computes the missing images of the last group too)."""
    rows, cols = box_blocks(cfg, box)
    computed = -(-images // cfg.box_n) * rows * cols * cfg.block_m
    return computed * 3 <= images * box[0] * box[1] * 4


def _prune(table: list[KernelConfig], kind: str, m: int, n_per_group: int, k_per_group: int,
           elem_bytes: int, has_res: bool, smem_limit: int = SMEM_LIMIT,
           sms: int = SMS, taps: int = 1, groups: int = 1,
           box: tuple[int, int] | None = None) -> list[KernelConfig]:
    keep = []
    max_n = _pow2_at_least(n_per_group)
    max_k = _pow2_at_least(k_per_group)
    max_m = _pow2_at_least(m, 64)
    for cfg in table:
        if smem_bytes(cfg, elem_bytes, has_res) > smem_limit:
            continue
        tiles = -(-m // cfg.block_m) * -(-n_per_group // cfg.block_n)  # per group
        # TMA: 16-bit (fp32 operands are rounded to TF32 in registers, see below), and rows
        # of whole 16-byte multiples (a descriptor's strides must be); the GEMM's rows, or
        # the implicit GEMM's box rows on a layer whose boxes TMA can load (``box``), whole
        # channel blocks per tap (a partial block would read the next tap's weights) and
        # blocks that waste at most a quarter of what they compute
        if cfg.tma and (elem_bytes != 2 or (k_per_group * elem_bytes) % 16
                        or (n_per_group * elem_bytes) % 16):
            continue
        if cfg.tma and kind == "gemm" and cfg.box_h:
            continue
        if cfg.tma and kind != "gemm" and (kind != "conv" or not cfg.box_h or box is None
                                           or k_per_group % cfg.block_k
                                           or not box_waste_ok(cfg, box,
                                                               m // (box[0] * box[1]))):
            continue
        if cfg.early_res and not has_res:  # (the same kernel as the row without it)
            continue
        if cfg.split_k > 1:
            # fewer output tiles than SMs (the layer leaves SMs idle), at most two programs
            # per SM once split, and at least four K steps per split (the partial sums'
            # round trip through memory and the second kernel cost about that much)
            programs = tiles * groups
            steps = k_steps(cfg, kind, k_per_group, taps)
            if (kind not in ("gemm", "conv") or cfg.persistent or cfg.tma or cfg.early_res
                    or programs >= sms or programs * cfg.split_k > 2 * sms
                    or steps < 4 * cfg.split_k):
                continue
        if cfg.persistent:  # gemm only; two tiles or more per program; the programs of
            # one SM fit its shared memory together; pipelined by this Triton
            if (kind != "gemm" or tiles < 2 * cfg.persistent * sms
                    or not (cfg.tma or POINTER_PERSISTENT)
                    or cfg.persistent * smem_bytes(cfg, elem_bytes, has_res) > smem_limit):
                continue
        # Compile report (sm_90): with fp32 operands (rounded to TF32 in registers) the early
        # residual tile spills (stack 8-200 bytes) in most rows.
        if cfg.early_res and elem_bytes == 4:
            continue
        acc_regs = cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
        if acc_regs > ACC_REGS_LIMIT:
            continue
        # Compile report (sm_90): a 128-register accumulator plus the residual tile of the
        # epilogue spills (stack 8-304 bytes, every dtype, 4 and 8 warps).
        if has_res and acc_regs >= 128:
            continue
        # Compile report (sm_90): fp32 implicit-GEMM tiles are rounded to TF32 in registers
        # before the dot, so the A and B tiles live in registers next to the accumulator;
        # past ~128 fp32 values per thread for the three together the 3x3 kernels spill
        # (128x64x64 with 4 warps: stack 56 bytes; 128x128x64: 496 bytes).
        if elem_bytes == 4 and kind in ("conv", "grouped"):
            tile_vals = (cfg.block_m * cfg.block_n + cfg.block_m * cfg.block_k
                         + cfg.block_k * cfg.block_n)
            if tile_vals > 128 * 32 * cfg.num_warps:
                continue
        if kind in ("gemm", "conv"):
            if cfg.block_n > max_n or cfg.block_k > max_k or cfg.block_m > max_m:
                continue
            if cfg.block_n < 64 <= n_per_group:  # narrow tiles only for narrow groups
                continue
            if cfg.block_m >= 4 * cfg.block_n and n_per_group > cfg.block_n:
                continue  # tall, narrow tiles only for layers no wider than the tile
        if kind in ("stem", "grouped") and cfg.block_m > max_m:
            continue
        if kind == "grouped" and cfg.block_k < 2 * k_per_group:
            continue
        keep.append(cfg)
    if not keep:  # tiny layer: the smallest row still runs correctly (masks); on a GPU with
        # little shared memory, with as few pipeline stages as it takes to fit
        cfg = min((c for c in table
                   if not (c.persistent or c.early_res or c.tma or c.split_k > 1)),
                  key=lambda c: (c.block_m * c.block_n * c.block_k, c.num_stages))
        while cfg.num_stages > 1 and smem_bytes(cfg, elem_bytes) > smem_limit:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        keep = [cfg]
    return keep
