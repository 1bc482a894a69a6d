"""When a kernel's loop runs in parallel, and when it runs in the calling thread.

A TIR ``T.parallel`` loop becomes one TVMBackendParallelLaunch: the calling thread hands each worker
its share, works its own, and waits for every worker at a barrier. That costs a wake-up and a
barrier whatever the loop's size: on this project's 2-vCPU machine (Zen 3, quiet, 2026-12-07),
1,024 float adds take 0.09 us in one thread and 2.1 us as a 2-thread launch, 16,384 take 2.0 us
against 2.8 us, 65,536 12 us against 8 us (``python -m bench.launch_cost``); under load (load
average ~10) a launch took over 1 ms, since a descheduled worker stalls the barrier. A decode step of mobilemoe-s made 461 such
launches per token (19 a layer; counted in its --dump-ir module, fp32 kernels), most of them for one
token's norms, residual adds, RoPE, SiLU and routing softmax (with the dot kernels also the activation
quantization of each INT4 kernel and one per MoE slot), and each one is a point where a descheduled
worker stalls the whole step (the 2-thread decode swings run to run). With these thresholds: 242.

So loops below these sizes stay serial; the weight-streaming kernels (row blocks of the INT4 GEMVs,
the experts, attention over the cache) keep one parallel launch each.
"""

SERIAL_MAX_ELEMENTS = 16384  # elementwise / row kernels whose output has at most this many elements
SERIAL_ROWS = 8  # activation rows quantized in the calling thread (decode: 1 row, or top_k per slot)
