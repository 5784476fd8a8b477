"""Host-side conversion from our block pattern to the inputs of popsparse's matmuls (pure numpy).

Our weight is ``W [out, in]`` and a layer computes ``Y = X · Wᵀ``. popsparse multiplies with the
input on the left, ``Y = X · V``, so its weight is ``V = Wᵀ [in, out]``: block ``(r, c)`` of ``W`` is
block ``(c, r)`` of ``V`` with its ``b × b`` content transposed.

* **Dynamic** (``popsparse::dynamic``, pattern as runtime data): the host partitioner takes COO
  triplets in *element* coordinates of ``V`` (``row = c·b``, ``col = r·b``) with each block's values
  row-major; it returns the metainfo and nz buffers that are uploaded between phases. The op is sized
  at compile time by ``max_non_zero_blocks`` (our fixed nnz) and the nz ratio.
* **Static** block-sparse (``popsparse::experimental::bsMatMul``, pattern compiled in, for frozen
  patterns): attributes ``matrix_dims [M, K, N]``, ``block_size [bM, bK, bN]``, the flattened 0/1
  ``sparsity_mask`` of ``V``'s block grid, ``bsr_rhs_lengths_per_2d_plane [nnz]``; the weight input is
  ``[nnz, bK·bN]`` in the mask's row-major order.

``slot_order`` maps our slots (sorted row-major in ``W``) to popsparse's order, so values and
optimizer moments can be laid out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sparse.pattern import BlockPattern


class PopsparseError(ValueError):
    """A layer that a popsparse op cannot take; one actionable line."""


@dataclass
class DynamicCoo:
    rows: np.ndarray  # int32 element row of each block's top-left corner in V = Wᵀ
    cols: np.ndarray  # int32 element column
    values: np.ndarray  # [nnz, b*b] float32, each block of V row-major
    order: np.ndarray  # our slot index of each entry


def slot_order(pattern: BlockPattern) -> np.ndarray:
    """Our slots in popsparse order: sorted by ``(col, row)`` of W, i.e. row-major in ``V = Wᵀ``."""
    rows, cols = pattern.rows.cpu().numpy().astype(np.int64), pattern.cols.cpu().numpy().astype(np.int64)
    return np.lexsort((rows, cols))


def dynamic_coo(pattern: BlockPattern, values) -> DynamicCoo:
    """The COO triplets the popsparse dynamic host partitioner takes for this layer."""
    b = pattern.block_size
    values = np.asarray(values.detach().float().cpu() if hasattr(values, "detach") else values, dtype=np.float32)
    if values.shape != (pattern.nnz, b, b):
        raise PopsparseError(f"values have shape {values.shape}, the pattern needs {(pattern.nnz, b, b)}")
    order = slot_order(pattern)
    rows, cols = pattern.rows.cpu().numpy()[order], pattern.cols.cpu().numpy()[order]
    blocks = values[order].transpose(0, 2, 1).reshape(pattern.nnz, b * b)  # each block of V = Wᵀ
    return DynamicCoo(rows=(cols * b).astype(np.int32), cols=(rows * b).astype(np.int32), values=blocks,
                      order=order)


def dense_from_dynamic_coo(coo: DynamicCoo, in_features: int, out_features: int, block_size: int) -> np.ndarray:
    """``V [in, out]`` rebuilt from triplets (the inverse, for checks)."""
    b = block_size
    dense = np.zeros((in_features, out_features), dtype=np.float32)
    for r, c, block in zip(coo.rows, coo.cols, coo.values):
        dense[r:r + b, c:c + b] = block.reshape(b, b)
    return dense


def dynamic_params(pattern: BlockPattern, batch_size: int, dtype: str = "float16") -> dict:
    """The popsparse dynamic fully-connected parameters of a layer (op attributes)."""
    check_dynamic_block(pattern.block_size, dtype)
    out_features, in_features = pattern.shape
    return {"input_size": in_features, "output_size": out_features, "batch_size": batch_size, "num_groups": 1,
            "block_size": pattern.block_size, "max_non_zero_blocks": pattern.nnz,
            "nz_ratio": pattern.nnz / pattern.num_blocks, "data_type": dtype}


def check_dynamic_block(block_size: int, dtype: str) -> None:
    """popsparse dynamic takes 1×1 blocks, or square blocks divisible by 4/8/16 (half) or 4/8 (float)."""
    allowed = (4, 8, 16) if dtype == "float16" else (4, 8)
    if block_size != 1 and not any(block_size % a == 0 for a in allowed):
        raise PopsparseError(f"popsparse dynamic sparsity has no {block_size}x{block_size} {dtype} blocks; use 1 or a "
                             f"multiple of {'/'.join(map(str, allowed))}")


def sparse_matmul_options(available_memory_proportion: float = 0.9, bucket_oversize: float = 0.2,
                          partials: str = "float", block_size: int = 1) -> dict:
    """popsparse dynamic matmul options (strings, as Poplar's OptionFlags take them)."""
    if partials == "half" and block_size == 1:
        raise PopsparseError("popsparse dynamic sparsity does not support half partials with 1x1 blocks; set "
                             "ipu.enable_half_partials=false or use blocks")
    return {"availableMemoryProportion": str(available_memory_proportion),
            "metaInfoBucketOversizeProportion": str(bucket_oversize), "partialsType": partials,
            "doGradAPass": "true", "doGradWPass": "true"}


@dataclass
class StaticBsMatMul:
    attributes: dict
    weight: np.ndarray  # [nnz, b*b]: the op's rhs input, blocks of V row-major in mask order
    order: np.ndarray


def static_bsmatmul(pattern: BlockPattern, values, tokens: int, dtype: str = "float16",
                    lhs_block: int = 16) -> StaticBsMatMul:
    """Attributes and weight input of the static block-sparse matmul ``Y[tokens, out] = X · V``."""
    b = pattern.block_size
    need = 16 if dtype == "float16" else 8
    if b % need:
        raise PopsparseError(f"static block-sparse matmul needs blocks divisible by {need} for {dtype}, got {b}; "
                             "use the dynamic op or the masked path")
    if tokens % lhs_block:
        raise PopsparseError(f"{tokens} tokens per call are not a multiple of the lhs block {lhs_block}")
    out_features, in_features = pattern.shape
    coo = dynamic_coo(pattern, values)  # the same order: row-major blocks of V
    mask = np.zeros((in_features // b, out_features // b), dtype=np.int64)
    mask[coo.rows // b, coo.cols // b] = 1
    type_name = {"float16": "float16", "float32": "float32"}[dtype]
    attributes = {
        "matrix_dims": [tokens, in_features, out_features],
        "block_size": [lhs_block, b, b],
        "sparsity_mask": mask.reshape(-1).tolist(),
        "bsr_rhs_lengths_per_2d_plane": [pattern.nnz],
        "bsmatmul_type": 0,  # dense lhs x sparse rhs -> dense out
        "transpose_rhs": 0,
        "in_type": type_name, "out_type": type_name, "pp_type": "float32",
    }
    return StaticBsMatMul(attributes, coo.values, coo.order)


def static_bsmatmul_reference(x: np.ndarray, op: StaticBsMatMul) -> np.ndarray:
    """What the static op computes, from its attributes and weight alone (for checks)."""
    m, k, n = op.attributes["matrix_dims"]
    _, bk, bn = op.attributes["block_size"]
    mask = np.asarray(op.attributes["sparsity_mask"]).reshape(k // bk, n // bn)
    dense = np.zeros((k, n), dtype=np.float32)
    for (i, j), block in zip(np.argwhere(mask == 1), op.weight):  # argwhere is row-major: the mask order
        dense[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn] = block.reshape(bk, bn)
    return x @ dense
