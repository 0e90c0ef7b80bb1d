"""Mamba (Hugging Face `MambaForCausalLM`): weight sparsity only.

Each block `backbone.layers[i]` is an RMSNorm and a `mixer` whose Linears are in_proj, x_proj, dt_proj and
out_proj: what the sparsity methods prune. conv1d (a depthwise Conv1d), A_log and D are not Linears and stay
dense; so do the embeddings and the tied lm_head, which live outside the blocks. There are no attention heads
or FFN neurons, so the structured pipeline does not apply (see SparsityOnlyAdapter).

dt_proj is never called as a module: MambaMixer multiplies by `dt_proj.weight` directly and passes its bias to
the scan as `delta_bias`, so a hook on dt_proj never fires and a calibration pass sees no input for it. The
adapter taps x_proj instead: a forward hook that, while dt_proj carries hooks, calls dt_proj on its real
input (the first `time_step_rank` outputs of x_proj) and discards the result, so dt_proj's hooks fire as if
the mixer had called it. With no hooks on dt_proj the tap does nothing (no cost at inference or export).

ONNX, as found on torch 2.13 / transformers 5.23 / onnxruntime 1.31 (CPU; the reference PyTorch scan, since
mamba_ssm and causal_conv1d are not installed): the model exports, but only for the sequence length it was
exported at, because the reference selective scan (`mamba_selective_scan`, modeling_mamba.py:260) is a Python
loop `for index in range(seq_len)`.
- torch.onnx.export(dynamo=False), pruneflow's default exporter (onnx_io.export_onnx): the trace unrolls the
  loop. The file declares dynamic `batch` and `sequence` axes and matches PyTorch (max |Δlogits| ~5e-7) at
  the exported length, for any batch size, padded or not; at another length onnxruntime fails:
  "Non-zero status code returned while running Add node. Name:'/model/backbone/layers.0/mixer/Add_10'
  Status Message: ... Attempting to broadcast an axis by a dimension other than 1. 8 by 13".
- torch.onnx.export(dynamo=True): exports (8 s) but silently pins the sequence axis (inputs ['batch', 8]);
  onnxruntime then refuses other lengths: "Got invalid dimensions for input: input_ids for the following
  indices index: 1 Got: 13 Expected: 8". torch.export.export with Dim("sequence") says why: "Constraints
  violated (sequence)! ... You marked sequence as dynamic but your code specialized it to be a constant (8)",
  the guard Eq(s, 8) being added at modeling_mamba.py:260.
So an exported Mamba is a fixed-length model; tests/test_mamba.py pins both facts (parity at the exported
length, failure at another) so that a transformers change making the scan exportable shows up there.
"""

from __future__ import annotations

from torch import nn

from pruneflow.adapters.base import SparsityOnlyAdapter
from pruneflow.adapters.registry import register


class DtProjInputTap:
    """Forward hook on x_proj that feeds dt_proj's hooks the input the mixer gives dt_proj's weight.
    A callable object, not a closure, so that copy.deepcopy(model) points the copy's tap at the copy's dt_proj."""

    def __init__(self, dt_proj: nn.Linear):
        self.dt_proj = dt_proj

    def __call__(self, module: nn.Module, args: tuple, output):
        dt = self.dt_proj
        if dt._forward_pre_hooks or dt._forward_hooks:
            dt(output[..., :dt.in_features])  # time_step, as split off in MambaMixer.forward
        return None  # x_proj's output unchanged


def tap_dt_proj(mixer: nn.Module) -> None:
    """Install the tap once per mixer (get_adapter is called many times on one model)."""
    if not any(isinstance(h, DtProjInputTap) for h in mixer.x_proj._forward_hooks.values()):
        mixer.x_proj.register_forward_hook(DtProjInputTap(mixer.dt_proj))


@register
class MambaAdapter(SparsityOnlyAdapter):
    family = "mamba"
    model_types = ("mamba",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for block in self.layers():
            tap_dt_proj(block.mixer)

    def layers(self): return self.model.backbone.layers
