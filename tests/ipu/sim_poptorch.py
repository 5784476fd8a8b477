"""A CPU simulation of the PopTorch surface the IPU trainer uses, precise enough to run it end to
end: ``trainingModel`` runs each call as gradient accumulation over micro-batches (mean reduction),
clips, steps a ``poptorch.optim.AdamW`` look-alike whose ``state_dict()`` exposes the moments as
PopART-named copies (``Accl1___NAME``) that only ``load_state_dict`` writes back, as on a device.
Option calls and executor calls are recorded."""

import torch

from .recorder import Recorder


class _Training:
    def __init__(self, log):
        self._log = log
        self.accumulation = 1

    def gradientAccumulation(self, n):
        self.accumulation = n
        self._log.append(("Options().Training.gradientAccumulation", (n,), {}))

    def __getattr__(self, name):
        return Recorder(self._log, f"Options().Training.{name}")


class _Options:
    def __init__(self, log):
        self._log = log
        self.Training = _Training(log)
        self.updatable = None

    def updatableNamedBuffers(self, names):
        self.updatable = list(names)

    def __getattr__(self, name):
        return Recorder(self._log, f"Options().{name}")


class AdamW(torch.optim.AdamW):
    def __init__(self, params, lr, betas, eps, weight_decay, loss_scaling=None, max_grad_norm=None,
                 bias_correction=True, accum_type=None, first_order_momentum_accum_type=None,
                 second_order_momentum_accum_type=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.names = None  # set when attached to an executor

    def state_dict(self):
        sd = super().state_dict()
        if self.names is not None:
            ipu = {}
            for p, st in self.state.items():
                if "exp_avg" in st:
                    ipu[f"Accl1___{self.names[p]}"] = st["exp_avg"].clone()  # a host copy of device memory
                    ipu[f"Accl2___{self.names[p]}"] = st["exp_avg_sq"].clone()
            sd["ipu_state"] = ipu
        return sd

    def load_state_dict(self, sd):
        sd = dict(sd)
        ipu = sd.pop("ipu_state", None)
        super().load_state_dict(sd)
        if ipu and self.names is not None:
            by_name = {n: p for p, n in self.names.items()}
            for key, value in ipu.items():
                moment, name = key.split("___", 1)
                self.state[by_name[name]]["exp_avg" if moment == "Accl1" else "exp_avg_sq"].copy_(value)


class _Optim:
    AdamW = AdamW


class Executor:
    def __init__(self, module, options, optimizer, log, sim):
        self.module, self.options, self.optimizer, self.log, self.sim = module, options, optimizer, log, sim
        optimizer.names = {p: n for n, p in module.named_parameters()}
        self.buffer_names = {n for n, _ in module.named_buffers()}
        assert set(options.updatable or []) <= self.buffer_names, "updatable buffers must be named_buffers()"

    def __call__(self, **batch):
        self.log.append(("executor()", (), {}))
        self.sim.on_ipu = True
        try:
            return self._run(**batch)
        finally:
            self.sim.on_ipu = False

    def _run(self, **batch):
        accumulation = self.options.Training.accumulation
        n = batch["input_ids"].shape[0] // accumulation
        self.module.train()
        outs = []
        for i in range(accumulation):
            micro = {k: v[i * n:(i + 1) * n] for k, v in batch.items()}
            out = self.module(**micro)
            (out[0] / accumulation).backward()
            outs.append([t.detach() for t in out])
        if self.optimizer.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.optimizer.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))  # OutputMode.Sum: summed by caller

    def __getattr__(self, name):
        return Recorder(self.log, f"executor.{name}")


class SimPoptorch:
    def __init__(self):
        self.log = []
        self.on_ipu = False
        self.optim = _Optim()
        self.ReductionType = Recorder(self.log, "ReductionType")
        self.OutputMode = Recorder(self.log, "OutputMode")

    def Options(self):
        return _Options(self.log)

    def __getattr__(self, name):
        return Recorder(self.log, name)

    def BeginBlock(self, module, user_id=None, ipu_id=None):
        self.log.append(("BeginBlock", (user_id,), {"ipu_id": ipu_id}))
        return module

    def recomputationCheckpoint(self, tensor):
        return tensor

    def identity_loss(self, loss, reduction):
        assert reduction == "none"
        return loss

    def trainingModel(self, module, options=None, optimizer=None):
        self.log.append(("trainingModel", (), {}))
        return Executor(module, options, optimizer, self.log, self)

    def isRunningOnIpu(self):
        return self.on_ipu

    def custom_op(self, inputs, name, domain, domain_version, example_outputs, attributes=None):
        from .fake_library import emulate_op, emulate_static_op

        assert domain == "ai.graphcore" and domain_version == 1
        self.log.append(("custom_op", (name,), {}))
        y = {"DynSparseMatMul": emulate_op, "StaticBsMatMul": emulate_static_op}[name](inputs, attributes)
        assert y.shape == example_outputs[0].shape
        return [y]
