// DynSparse BERT: a dynamic block-sparse matmul for PopART / PopTorch over popsparse::dynamic.
//
//   Y[batch, out] = X[batch, in] . V,   V = W^T [in, out], stored as popsparse metainfo + nz values
//
// The pattern is runtime data (the metainfo buffer), so the host can rewrite it between training
// phases without recompiling; the op is sized at compile time by max_non_zero_blocks. Inputs:
//   0  x         [batch, in]   activations (float or half)
//   1  metainfo  [M]           popsparse metainfo, uint16 bits carried in a half tensor
//   2  nz        [N]           non-zero values in popsparse's device order (the trainable parameter)
// Attributes (ints unless noted): block_size, input_size, output_size, batch_size,
// max_non_zero_blocks, options (string "key=value;key=value" of popsparse option flags).
// The gradient op returns dX (fullyConnectedGradA) and dNz (fullyConnectedSparseGradW, in the nz
// layout). extern "C" host helpers size the buffers and convert block-COO <-> metainfo/nz with the
// popsparse host partitioner on an offline IPU target (no device needed); ipu_app/ipu/custom_ops.py
// loads them with ctypes.
//
// Build: source the Poplar SDK's enable.sh, then `make -C popart_ops`.

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <poplar/Graph.hpp>
#include <poplar/OptionFlags.hpp>
#include <poplar/Target.hpp>
#include <popsparse/FullyConnected.hpp>
#include <popsparse/FullyConnectedParams.hpp>
#include <popsparse/PlanningCache.hpp>
#include <popsparse/SparsePartitioner.hpp>
#include <popsparse/SparseStorageFormats.hpp>
#include <popsparse/SparseTensor.hpp>
#include <popsparse/codelets.hpp>

#include <popart/op.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>

namespace ipu_app {

using popsparse::dynamic::FullyConnectedParams;
using popsparse::dynamic::PlanningCache;
using popsparse::dynamic::SparseTensor;

const popart::OperatorIdentifier DynSparseMatMulId = {"ai.graphcore", "DynSparseMatMul", 1};
const popart::OperatorIdentifier DynSparseMatMulGradId = {"ai.graphcore", "DynSparseMatMulGrad", 1};

struct Attrs {
  int64_t blockSize = 1;
  int64_t inputSize = 0;
  int64_t outputSize = 0;
  int64_t batchSize = 0;
  int64_t maxNonZeroBlocks = 0;
  std::string options;
};

poplar::OptionFlags parseOptions(const std::string &text) {
  poplar::OptionFlags flags;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ';')) {
    auto eq = item.find('=');
    if (eq != std::string::npos) {
      flags.set(item.substr(0, eq), item.substr(eq + 1));
    }
  }
  return flags;
}

FullyConnectedParams fcParams(const Attrs &a) {
  using namespace popsparse::dynamic;
  const auto b = static_cast<std::size_t>(a.blockSize);
  SparsityParams sparsity(SparsityType::Element, SparsityStructure::Unstructured, {b, b});
  const double blocks = double(a.inputSize / a.blockSize) * double(a.outputSize / a.blockSize);
  return FullyConnectedParams::createWithNzRatio(sparsity, double(a.maxNonZeroBlocks) / blocks,
                                                 static_cast<std::size_t>(a.batchSize), 1,
                                                 static_cast<std::size_t>(a.inputSize),
                                                 static_cast<std::size_t>(a.outputSize));
}

PlanningCache *planningCache() {
  static thread_local PlanningCache cache;
  return &cache;
}

void addCodeletsOnce(poplar::Graph &graph) {
  static std::mutex mutex;
  static std::set<const poplar::Graph *> done;
  std::lock_guard<std::mutex> lock(mutex);
  auto &top = graph.getTopLevelGraph();
  if (done.insert(&top).second) {
    popsparse::addCodelets(top);
  }
}

void appendAttrs(popart::OpSerialiserBase &os, const Attrs &a) {
  os.appendAttribute("block_size", a.blockSize);
  os.appendAttribute("input_size", a.inputSize);
  os.appendAttribute("output_size", a.outputSize);
  os.appendAttribute("batch_size", a.batchSize);
  os.appendAttribute("max_non_zero_blocks", a.maxNonZeroBlocks);
  os.appendAttribute("options", a.options);
}

// ------------------------------------------------------------------------------------- ops
// What the forward and gradient ops share: the layer attributes and how they are serialised.
class DynSparseOpBase : public popart::Op {
public:
  DynSparseOpBase(const popart::OperatorIdentifier &opid, const Attrs &attrs, const popart::Op::Settings &settings)
      : popart::Op(opid, settings), attrs_(attrs) {}

  void appendAttributes(popart::OpSerialiserBase &os) const override {
    popart::Op::appendAttributes(os);
    appendAttrs(os, attrs_);
  }
  void appendOutlineAttributes(popart::OpSerialiserBase &os) const override {
    popart::Op::appendOutlineAttributes(os);
    appendAttrs(os, attrs_);
  }
  float getSubgraphValue() const final { return getHighSubgraphValue(); }
  bool requiresRandomSeed() const override { return false; }
  const Attrs &attrs() const { return attrs_; }

private:
  Attrs attrs_;
};

class DynSparseMatMulOp : public DynSparseOpBase {
public:
  DynSparseMatMulOp(const popart::OperatorIdentifier &opid, const Attrs &attrs,
                    const popart::Op::Settings &settings)
      : DynSparseOpBase(opid, attrs, settings) {}

  std::unique_ptr<popart::Op> clone() const final { return std::make_unique<DynSparseMatMulOp>(*this); }

  void setup() final {
    const auto &a = attrs();
    if (inInfo(0).rank() != 2 || inInfo(0).dim(0) != a.batchSize || inInfo(0).dim(1) != a.inputSize) {
      throw popart::error("DynSparseMatMul: x must be [batch_size, input_size] = [{}, {}]", a.batchSize,
                          a.inputSize);
    }
    outInfo(0) = {inInfo(0).dataType(), {a.batchSize, a.outputSize}};
  }

  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;
};

class DynSparseMatMulGradOp : public DynSparseOpBase {
public:
  explicit DynSparseMatMulGradOp(const DynSparseMatMulOp &fwd)
      : DynSparseOpBase(DynSparseMatMulGradId, fwd.attrs(), fwd.settings) {}

  std::unique_ptr<popart::Op> clone() const final { return std::make_unique<DynSparseMatMulGradOp>(*this); }

  // inputs: 0 dY, 1 x, 2 metainfo, 3 nz; outputs: 0 dX, 1 dNz
  void setup() final {
    outInfo(0) = inInfo(1);
    outInfo(1) = inInfo(3);
  }
  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    static const std::vector<popart::GradInOutMapper> info = {
        {0, 0, popart::GradOpInType::GradOut},
        {1, 0, popart::GradOpInType::In},
        {2, 1, popart::GradOpInType::In},
        {3, 2, popart::GradOpInType::In}};
    return info;
  }
  const std::map<int, int> &gradOutToNonGradIn() const final {
    static const std::map<int, int> out = {{0, 0}, {1, 2}};
    return out;
  }
};

std::vector<std::unique_ptr<popart::Op>> DynSparseMatMulOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(std::make_unique<DynSparseMatMulGradOp>(*this));
  return ops;
}

// ------------------------------------------------------------------------------------ opxs
class DynSparseMatMulOpx : public popart::popx::Opx {
public:
  DynSparseMatMulOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<DynSparseMatMulOp>(op, DynSparseMatMulId);
  }

  // The op lays out its own inputs, as popsparse plans them (the TF ops' allocator did the same).
  popart::popx::InputCreatorType getInputCreatorType(popart::InIndex index) const final {
    return index <= 2 ? popart::popx::InputCreatorType::CanCreate : popart::popx::Opx::getInputCreatorType(index);
  }

  std::set<popart::TensorId> mustExistBeforeCreate(popart::InIndex) const final { return {}; }

  poplar::Tensor createInput(popart::InIndex index, const poplar::DebugNameAndId &dnai) const final {
    const auto &op = getOp<DynSparseMatMulOp>();
    const auto type = popart::popx::popType(op.inInfo(0));
    const auto params = fcParams(op.attrs());
    const auto options = parseOptions(op.attrs().options);
    if (index == 0) {
      return popsparse::dynamic::createFullyConnectedInput(graph(), type, params, dnai, options, planningCache());
    }
    auto weights =
        popsparse::dynamic::createFullyConnectedWeights(graph(), type, params, dnai, options, planningCache());
    if (index == 1) {
      return weights.getMetaInfoTensor().reinterpret(poplar::HALF);
    }
    return weights.getNzValuesTensor();
  }

  void grow(poplar::program::Sequence &prog) const final {
    addCodeletsOnce(graph());
    const auto &op = getOp<DynSparseMatMulOp>();
    const auto params = fcParams(op.attrs());
    const auto options = parseOptions(op.attrs().options);
    SparseTensor weights(getInTensor(1).reinterpret(poplar::UNSIGNED_SHORT), getInTensor(2));
    auto y = popsparse::dynamic::fullyConnectedFwd(graph(), weights, getInTensor(0), params, prog,
                                                   debugContext("DynSparseMatMul"), options, planningCache());
    setOutTensor(0, y);
  }
};

class DynSparseMatMulGradOpx : public popart::popx::Opx {
public:
  DynSparseMatMulGradOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<DynSparseMatMulGradOp>(op, DynSparseMatMulGradId);
  }

  void grow(poplar::program::Sequence &prog) const final {
    addCodeletsOnce(graph());
    const auto &op = getOp<DynSparseMatMulGradOp>();
    const auto params = fcParams(op.attrs());
    const auto options = parseOptions(op.attrs().options);
    const auto dy = getInTensor(0);
    const auto x = getInTensor(1);
    const auto metaInfo = getInTensor(2).reinterpret(poplar::UNSIGNED_SHORT);
    SparseTensor weights(metaInfo, getInTensor(3));
    auto dx = popsparse::dynamic::fullyConnectedGradA(graph(), weights, dy, params, prog,
                                                      debugContext("DynSparseMatMulGradA"), options, planningCache());
    auto dnz = popsparse::dynamic::fullyConnectedSparseGradW(graph(), metaInfo, dy, x, params, prog,
                                                             debugContext("DynSparseMatMulGradW"), options,
                                                             planningCache());
    setOutTensor(0, dx);
    setOutTensor(1, dnz);
  }
};

// ---------------------------------------------------------------------------- registration
namespace {
const popart::OpDefinition::DataTypes T = {popart::DataType::FLOAT16, popart::DataType::FLOAT};

const popart::OpCreator<DynSparseMatMulOp> creator(
    popart::OpDefinitions({{DynSparseMatMulId,
                            popart::OpDefinition(popart::OpDefinition::Inputs({{"x", T}, {"metainfo", T}, {"nz", T}}),
                                                 popart::OpDefinition::Outputs({{"y", T}}),
                                                 popart::OpDefinition::Attributes({{"block_size", {"*"}},
                                                                                   {"input_size", {"*"}},
                                                                                   {"output_size", {"*"}},
                                                                                   {"batch_size", {"*"}},
                                                                                   {"max_non_zero_blocks", {"*"}},
                                                                                   {"options", {"*"}}}))}}),
    [](const popart::OpCreatorInfo &info) {
      Attrs a;
      a.blockSize = info.attributes.getAttribute<popart::Attributes::Int>("block_size");
      a.inputSize = info.attributes.getAttribute<popart::Attributes::Int>("input_size");
      a.outputSize = info.attributes.getAttribute<popart::Attributes::Int>("output_size");
      a.batchSize = info.attributes.getAttribute<popart::Attributes::Int>("batch_size");
      a.maxNonZeroBlocks = info.attributes.getAttribute<popart::Attributes::Int>("max_non_zero_blocks");
      a.options = info.attributes.getAttribute<popart::Attributes::String>("options", "");
      return std::make_unique<DynSparseMatMulOp>(info.opid, a, info.settings);
    },
    true);

const popart::popx::OpxCreator<DynSparseMatMulOpx> opxCreator(DynSparseMatMulId);
const popart::popx::OpxCreator<DynSparseMatMulGradOpx> gradOpxCreator(DynSparseMatMulGradId);

Attrs hostAttrs(int64_t blockSize, int64_t inputSize, int64_t outputSize, int64_t batchSize, int64_t nnz,
                const char *options) {
  Attrs a;
  a.blockSize = blockSize;
  a.inputSize = inputSize;
  a.outputSize = outputSize;
  a.batchSize = batchSize;
  a.maxNonZeroBlocks = nnz;
  a.options = options ? options : "";
  return a;
}

// The popsparse host partitioner for a layer, on an offline IPU target (no device needed); on the
// heap because the partitioner is not guaranteed to be movable.
std::unique_ptr<popsparse::dynamic::Partitioner<float>> hostPartitioner(int64_t blockSize, int64_t inputSize,
                                                                        int64_t outputSize, int64_t batchSize,
                                                                        int64_t nnz, int half, const char *options) {
  const auto a = hostAttrs(blockSize, inputSize, outputSize, batchSize, nnz, options);
  const auto target = poplar::Target::createIPUTarget(1, "ipu2");
  return std::make_unique<popsparse::dynamic::Partitioner<float>>(fcParams(a), half ? poplar::HALF : poplar::FLOAT,
                                                                  target, parseOptions(a.options), planningCache());
}

int fail(const std::exception &e, char *err, int64_t errLen) {
  if (err && errLen > 0) {
    std::strncpy(err, e.what(), static_cast<std::size_t>(errLen - 1));
    err[errLen - 1] = '\0';
  }
  return 1;
}
} // namespace
} // namespace ipu_app

// ---------------------------------------------------------------- host helpers (ctypes, C ABI)
extern "C" {

// Sizes of the metainfo and nz buffers popsparse plans for this layer (offline IPU target).
int ipu_app_dynsparse_sizes(int64_t blockSize, int64_t inputSize, int64_t outputSize, int64_t batchSize,
                            int64_t nnz, int half, const char *options, int64_t *metaInfoSize, int64_t *nzSize,
                            char *err, int64_t errLen) {
  try {
    const auto a = ipu_app::hostAttrs(blockSize, inputSize, outputSize, batchSize, nnz, options);
    auto target = poplar::Target::createIPUTarget(1, "ipu2");
    poplar::Graph graph(target);
    auto weights = popsparse::dynamic::createFullyConnectedWeights(
        graph, half ? poplar::HALF : poplar::FLOAT, ipu_app::fcParams(a), "weights", ipu_app::parseOptions(a.options),
        ipu_app::planningCache());
    *metaInfoSize = static_cast<int64_t>(weights.getMetaInfoTensor().numElements());
    *nzSize = static_cast<int64_t>(weights.getNzValuesTensor().numElements());
    return 0;
  } catch (const std::exception &e) {
    return ipu_app::fail(e, err, errLen);
  }
}

// Block-COO of V = W^T (element coordinates of block corners, blocks row-major) -> metainfo + nz.
int ipu_app_dynsparse_encode(int64_t blockSize, int64_t inputSize, int64_t outputSize, int64_t batchSize,
                             int64_t nnz, int half, const char *options, const int64_t *rows, const int64_t *cols,
                             const float *values, uint16_t *metaInfo, int64_t metaInfoSize, float *nz,
                             int64_t nzSize, char *err, int64_t errLen) {
  try {
    auto partitioner = ipu_app::hostPartitioner(blockSize, inputSize, outputSize, batchSize, nnz, half, options);
    const std::size_t b = static_cast<std::size_t>(blockSize);
    std::vector<float> nzValues(values, values + nnz * blockSize * blockSize);
    std::vector<std::size_t> rowIndices(rows, rows + nnz), colIndices(cols, cols + nnz);
    popsparse::COOMatrix<float> coo(static_cast<std::size_t>(inputSize), static_cast<std::size_t>(outputSize),
                                    nzValues, colIndices, rowIndices, {b, b});
    auto data = partitioner->createSparsityDataImpl(coo); // throws "Overflow in buckets" when it cannot fit
    if (static_cast<int64_t>(data.metaInfo.size()) > metaInfoSize || static_cast<int64_t>(data.nzValues.size()) > nzSize) {
      throw std::runtime_error("popsparse produced larger buffers than planned; raise metaInfoBucketOversizeProportion");
    }
    std::fill(metaInfo, metaInfo + metaInfoSize, 0);
    std::fill(nz, nz + nzSize, 0.0f);
    for (std::size_t i = 0; i < data.metaInfo.size(); ++i) {
      metaInfo[i] = static_cast<uint16_t>(data.metaInfo[i]);
    }
    std::copy(data.nzValues.begin(), data.nzValues.end(), nz);
    return 0;
  } catch (const std::exception &e) {
    return ipu_app::fail(e, err, errLen);
  }
}

// metainfo + nz -> block-COO of V (the inverse; for reading trained values and moments back).
int ipu_app_dynsparse_decode(int64_t blockSize, int64_t inputSize, int64_t outputSize, int64_t batchSize,
                             int64_t nnz, int half, const char *options, const uint16_t *metaInfo,
                             int64_t metaInfoSize, const float *nz, int64_t nzSize, int64_t *rows, int64_t *cols,
                             float *values, char *err, int64_t errLen) {
  try {
    auto partitioner = ipu_app::hostPartitioner(blockSize, inputSize, outputSize, batchSize, nnz, half, options);
    popsparse::dynamic::SparsityDataImpl<float> data;
    data.metaInfo.assign(metaInfo, metaInfo + metaInfoSize);
    data.nzValues.assign(nz, nz + nzSize);
    auto coo = partitioner->sparsityDataImplToCOOMatrix(data);
    if (static_cast<int64_t>(coo.rowIndices.size()) != nnz) {
      throw std::runtime_error("the device buffers hold a different number of blocks than the layer's nnz");
    }
    const std::size_t blockElements = static_cast<std::size_t>(blockSize * blockSize);
    for (int64_t i = 0; i < nnz; ++i) {
      rows[i] = static_cast<int64_t>(coo.rowIndices[i]);
      cols[i] = static_cast<int64_t>(coo.columnIndices[i]);
    }
    std::copy(coo.nzValues.begin(), coo.nzValues.begin() + nnz * blockElements, values);
    return 0;
  } catch (const std::exception &e) {
    return ipu_app::fail(e, err, errLen);
  }
}

} // extern "C"
