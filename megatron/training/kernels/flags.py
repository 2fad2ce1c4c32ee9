"""The fused-kernel flags (Megatron-LM's names), registered with the driver's parser.

Every fusion is on by default where it can run (see selection.py) and has a
flag that turns it off. Our own additions are --no-cross-entropy-loss-fusion
(Megatron-LM's fusion is opt-in with --cross-entropy-loss-fusion; here it is
on by default), the `liger` choice of --cross-entropy-fusion-impl,
--no-fused-adam (Megatron-LM always has Transformer Engine's or apex's
FusedAdam; without them megatron-core builds torch's AdamW, made fused here)
--no-foreach-grad-clip (likewise for the multi-tensor norm and scale of
gradient clipping) and --no-rmsnorm-fusion (torch's RMSNorm module instead of
ours, on a CPU).
"""


def add_kernel_flags(parser) -> None:
    g = parser.add_argument_group(
        "fused kernels", "each fusion runs by default where it can (CUDA; Transformer Engine's kernels when it is "
        "installed); the start-up line names the path each one takes")
    # Megatron-LM's on-by-default fusions: store_false, default True.
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion")
    g.add_argument("--no-persist-layer-norm", action="store_false", dest="persist_layer_norm")
    # The kernels this package provides: default None ("where it can run").
    g.add_argument("--no-bias-swiglu-fusion", action="store_false", dest="bias_swiglu_fusion", default=None,
                   help="SwiGLU on the fused [gate|up] fc1 output: Liger's Triton kernel, megatron-core's jit "
                        "fusion beside Transformer Engine")
    g.add_argument("--no-rope-fusion", action="store_false", dest="apply_rope_fusion", default=None,
                   help="rotary embedding on q/k views of the fused QKV: our Triton kernel, or Transformer Engine's")
    g.add_argument("--no-rmsnorm-fusion", action="store_false", dest="rmsnorm_fusion", default=None,
                   help="RMSNorm of the local spec as one autograd function on a CPU (torch's module is a "
                        "composite of elementwise passes there); off: torch.nn.RMSNorm")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion",
                   default=None, help="weight gradients accumulated straight into the fp32 main grads: apex's "
                                      "extension, else torch.addmm(out_dtype=fp32) (CUDA, torch >= 2.8)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true", dest="cross_entropy_loss_fusion",
                   default=None, help="vocab-parallel fused cross-entropy (on by default where it can run)")
    g.add_argument("--no-cross-entropy-loss-fusion", action="store_false", dest="cross_entropy_loss_fusion",
                   default=None)
    g.add_argument("--cross-entropy-fusion-impl", choices=["liger", "native", "te"], default=None,
                   help="liger: Liger's Triton kernel; native: megatron-core's fused path (bf16 gradients); "
                        "te: Transformer Engine's. Default: te with Transformer Engine, else liger")
    g.add_argument("--no-foreach-grad-clip", action="store_false", dest="foreach_grad_clip", default=None,
                   help="gradient norm and clipping with torch's foreach operators where Transformer Engine and apex "
                        "are absent (megatron-core's fallback loops over the tensors, copying each one)")
    g.add_argument("--no-fused-adam", action="store_false", dest="fused_adam", default=None,
                   help="torch's AdamW without fused=True (Transformer Engine's or apex's FusedAdam, when "
                        "installed, is megatron-core's choice and stays)")
