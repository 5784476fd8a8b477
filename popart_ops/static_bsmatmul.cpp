// DynSparse BERT: a static block-sparse matmul for PopART / PopTorch over
// popsparse::experimental::bsMatMul, for patterns that never change (static sparsity).
//
//   Y[M, N] = X[M, K] . V,   V = W^T [K, N] block-sparse with a compile-time block mask
//
// Inputs: 0 x [M, K]; 1 w [nnz, bK*bN] (the non-zero blocks of V, row-major, in mask order).
// Attributes: matrix_dims [M, K, N], block_size [bM, bK, bN], sparsity_mask (flattened 0/1 mask of
// V's [K/bK, N/bN] block grid), in_type / out_type / pp_type ("float16" | "float32"),
// partition_method (default "block-group2"), memory_cycle_ratio (default 1.0). The mask is part of
// the graph: a new pattern means a new executable (use the dynamic op for DynSparse). The gradient op
// returns dX = dY . V^T (the same sparse operand, transposed) and dW = X^T . dY computed only at the
// mask's blocks, in w's layout. ipu_app/ipu/custom_ops.py builds the inputs (StaticPopsparseLayers).
//
// Build: source the Poplar SDK's enable.sh, then `make -C popart_ops`.

#include <array>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include <poplar/Graph.hpp>
#include <popsparse/experimental/BlockSparseMatMul.hpp>

#include <popart/op.hpp>
#include <popart/opmanager.hpp>
#include <popart/opserialiser.hpp>
#include <popart/popx/opx.hpp>
#include <popart/popx/opxmanager.hpp>

namespace ipu_app_static {

const popart::OperatorIdentifier StaticBsMatMulId = {"ai.graphcore", "StaticBsMatMul", 1};
const popart::OperatorIdentifier StaticBsMatMulGradId = {"ai.graphcore", "StaticBsMatMulGrad", 1};

struct Attrs {
  std::array<int, 3> dims{};        // M, K, N
  std::array<int, 3> blocks{};      // bM, bK, bN
  std::vector<unsigned char> mask;  // [K/bK * N/bN]
  std::string inType = "float16", outType = "float16", ppType = "float32";
  std::string partitionMethod = "block-group2";
  float memoryCycleRatio = 1.0f;

  std::size_t nnz() const { return std::accumulate(mask.begin(), mask.end(), std::size_t{0}); }
};

poplar::Type typeOf(const std::string &name) { return name == "float32" ? poplar::FLOAT : poplar::HALF; }

poplar::OptionFlags optionsOf(const Attrs &a) {
  return {{"memoryCycleRatio", std::to_string(a.memoryCycleRatio)}, {"partitionMethod", a.partitionMethod}};
}

class StaticOpBase : public popart::Op {
public:
  StaticOpBase(const popart::OperatorIdentifier &opid, const Attrs &attrs, const popart::Op::Settings &settings)
      : popart::Op(opid, settings), attrs_(attrs) {}
  void appendOutlineAttributes(popart::OpSerialiserBase &os) const override {
    popart::Op::appendOutlineAttributes(os);
    os.appendAttribute("matrix_dims", std::vector<int64_t>(attrs_.dims.begin(), attrs_.dims.end()));
    os.appendAttribute("block_size", std::vector<int64_t>(attrs_.blocks.begin(), attrs_.blocks.end()));
    os.appendAttribute("sparsity_mask", std::vector<int64_t>(attrs_.mask.begin(), attrs_.mask.end()));
    os.appendAttribute("in_type", attrs_.inType);
  }
  float getSubgraphValue() const final { return getHighSubgraphValue(); }
  bool requiresRandomSeed() const override { return false; }
  const Attrs &attrs() const { return attrs_; }

private:
  Attrs attrs_;
};

class StaticBsMatMulOp : public StaticOpBase {
public:
  using StaticOpBase::StaticOpBase;
  std::unique_ptr<popart::Op> clone() const final { return std::make_unique<StaticBsMatMulOp>(*this); }
  void setup() final {
    const auto &a = attrs();
    const popart::Shape expected = {static_cast<int64_t>(a.nnz()), int64_t(a.blocks[1]) * a.blocks[2]};
    if (inInfo(1).shape() != expected) {
      throw popart::error("StaticBsMatMul: w must be [nnz, bK*bN] = [{}, {}]", expected[0], expected[1]);
    }
    outInfo(0) = {inInfo(0).dataType(), {a.dims[0], a.dims[2]}};
  }
  std::vector<std::unique_ptr<popart::Op>> getGradOps() final;
};

class StaticBsMatMulGradOp : public StaticOpBase {
public:
  explicit StaticBsMatMulGradOp(const StaticBsMatMulOp &fwd)
      : StaticOpBase(StaticBsMatMulGradId, fwd.attrs(), fwd.settings) {}
  std::unique_ptr<popart::Op> clone() const final { return std::make_unique<StaticBsMatMulGradOp>(*this); }
  // inputs: 0 dY, 1 x, 2 w; outputs: 0 dX, 1 dW
  void setup() final {
    outInfo(0) = inInfo(1);
    outInfo(1) = inInfo(2);
  }
  const std::vector<popart::GradInOutMapper> &gradInputInfo() const final {
    static const std::vector<popart::GradInOutMapper> info = {
        {0, 0, popart::GradOpInType::GradOut}, {1, 0, popart::GradOpInType::In}, {2, 1, popart::GradOpInType::In}};
    return info;
  }
  const std::map<int, int> &gradOutToNonGradIn() const final {
    static const std::map<int, int> out = {{0, 0}, {1, 1}};
    return out;
  }
};

std::vector<std::unique_ptr<popart::Op>> StaticBsMatMulOp::getGradOps() {
  std::vector<std::unique_ptr<popart::Op>> ops;
  ops.emplace_back(std::make_unique<StaticBsMatMulGradOp>(*this));
  return ops;
}

// Dense lhs x sparse rhs -> dense out (rhs used transposed when asked).
poplar::Tensor denseTimesSparse(poplar::Graph &graph, const Attrs &a, const std::array<int, 3> &dims,
                                const std::array<int, 3> &blocks, bool transposeRhs, const poplar::Tensor &lhs,
                                const poplar::Tensor &rhs, poplar::program::Sequence &prog, const std::string &name) {
  popsparse::experimental::BSMatMulParams params(dims, blocks, a.mask, transposeRhs, typeOf(a.inType),
                                                 typeOf(a.outType), typeOf(a.ppType), 1);
  return popsparse::experimental::bsMatMul(graph, params, prog, lhs, rhs, optionsOf(a), name);
}

class StaticBsMatMulOpx : public popart::popx::Opx {
public:
  StaticBsMatMulOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<StaticBsMatMulOp>(op, StaticBsMatMulId);
  }
  void grow(poplar::program::Sequence &prog) const final {
    const auto &a = getOp<StaticBsMatMulOp>().attrs();
    setOutTensor(0, denseTimesSparse(graph(), a, a.dims, a.blocks, false, getInTensor(0), getInTensor(1), prog,
                                     debugContext("StaticBsMatMul").getPathName()));
  }
};

class StaticBsMatMulGradOpx : public popart::popx::Opx {
public:
  StaticBsMatMulGradOpx(popart::Op *op, popart::popx::Devicex *devicex) : popart::popx::Opx(op, devicex) {
    verifyOp<StaticBsMatMulGradOp>(op, StaticBsMatMulGradId);
  }
  void grow(poplar::program::Sequence &prog) const final {
    const auto &a = getOp<StaticBsMatMulGradOp>().attrs();
    const auto dy = getInTensor(0), x = getInTensor(1), w = getInTensor(2);
    // dX[M, K] = dY[M, N] . V^T: the same sparse operand and mask, transposed.
    auto dx = denseTimesSparse(graph(), a, {a.dims[0], a.dims[2], a.dims[1]}, {a.blocks[0], a.blocks[2], a.blocks[1]},
                               true, dy, w, prog, debugContext("StaticBsMatMulGradX").getPathName());
    // dW = X^T[K, M] . dY[M, N] at the mask's blocks only: sparse output in w's layout.
    popsparse::experimental::BSMatMulParams params({a.dims[1], a.dims[0], a.dims[2]},
                                                   {a.blocks[1], a.blocks[0], a.blocks[2]}, a.mask, typeOf(a.inType),
                                                   typeOf(a.outType), typeOf(a.ppType),
                                                   popsparse::experimental::SubBlockMask::None, 1);
    auto dw = popsparse::experimental::bsMatMul(graph(), params, prog, x.transpose(), dy, optionsOf(a),
                                                debugContext("StaticBsMatMulGradW").getPathName());
    setOutTensor(0, dx);
    setOutTensor(1, dw);
  }
};

namespace {
const popart::OpDefinition::DataTypes T = {popart::DataType::FLOAT16, popart::DataType::FLOAT};

const popart::OpCreator<StaticBsMatMulOp> creator(
    popart::OpDefinitions({{StaticBsMatMulId,
                            popart::OpDefinition(popart::OpDefinition::Inputs({{"x", T}, {"w", T}}),
                                                 popart::OpDefinition::Outputs({{"y", T}}),
                                                 popart::OpDefinition::Attributes({{"matrix_dims", {"*"}},
                                                                                   {"block_size", {"*"}},
                                                                                   {"sparsity_mask", {"*"}},
                                                                                   {"in_type", {"*"}},
                                                                                   {"out_type", {"*"}},
                                                                                   {"pp_type", {"*"}},
                                                                                   {"partition_method", {"*"}},
                                                                                   {"memory_cycle_ratio", {"*"}}}))}}),
    [](const popart::OpCreatorInfo &info) {
      Attrs a;
      const auto dims = info.attributes.getAttribute<popart::Attributes::Ints>("matrix_dims");
      const auto blocks = info.attributes.getAttribute<popart::Attributes::Ints>("block_size");
      const auto mask = info.attributes.getAttribute<popart::Attributes::Ints>("sparsity_mask");
      if (dims.size() != 3 || blocks.size() != 3) {
        throw popart::error("StaticBsMatMul: matrix_dims and block_size need 3 entries");
      }
      for (int i = 0; i < 3; ++i) {
        a.dims[i] = static_cast<int>(dims[i]);
        a.blocks[i] = static_cast<int>(blocks[i]);
      }
      a.mask.assign(mask.begin(), mask.end());
      a.inType = info.attributes.getAttribute<popart::Attributes::String>("in_type", "float16");
      a.outType = info.attributes.getAttribute<popart::Attributes::String>("out_type", a.inType);
      a.ppType = info.attributes.getAttribute<popart::Attributes::String>("pp_type", "float32");
      a.partitionMethod = info.attributes.getAttribute<popart::Attributes::String>("partition_method", "block-group2");
      a.memoryCycleRatio = info.attributes.getAttribute<popart::Attributes::Float>("memory_cycle_ratio", 1.0f);
      return std::make_unique<StaticBsMatMulOp>(info.opid, a, info.settings);
    },
    true);

const popart::popx::OpxCreator<StaticBsMatMulOpx> opxCreator(StaticBsMatMulId);
const popart::popx::OpxCreator<StaticBsMatMulGradOpx> gradOpxCreator(StaticBsMatMulGradId);
} // namespace
} // namespace ipu_app_static
