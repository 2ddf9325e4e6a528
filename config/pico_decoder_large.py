# pico-decoder-large (569,808,384 parameters), one of the published pico-decoder sizes, with the
# training shape it was published with: 4 nodes x 4 GPUs, 8 micro-steps of 8 sequences per GPU.
#   torchrun --nproc_per_node=4 train.py config/pico_decoder_large.py --run_name=my-large   (one node)
#   on several nodes: the torchrun commands of docs/clusters.md#launching
# Everything not set here is train.py's default, which is pico-train's: 12 layers, 12 heads,
# 4 KV heads, vocab 50304, seq 2048; pico-lm/pretokenized-dolma streamed from the Hub, 1024
# sequences x 2048 tokens per step, 200,000 steps (one pass), lr 3e-4 with 2,500 warmup steps then
# linear decay; bf16 and DDP on GPUs (train.py's backend setting says when ZeRO-2).
# Per-GPU sub-batch = 1024 / (8 x GPUs): 8 on 16 GPUs, 32 on 4, 4 on 32. On fewer GPUs
# (or if it does not fit) raise gradient_accumulation_steps; the training is the same (up to rounding) either way.
run_name = "pico-decoder-large"
d_model = 1536
activation_hidden_dim = 6144
gradient_accumulation_steps = 8
learning_dynamics_batch_size = 128  # rows per capture batch over all GPUs (8 per GPU on 16); lower it on fewer GPUs
