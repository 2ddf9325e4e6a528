# pico-decoder-small (64,595,328 parameters), one of the published pico-decoder sizes.
#   torchrun --nproc_per_node=4 train.py config/pico_decoder_small.py --run_name=my-small
# Everything not set here is train.py's default, which is pico-train's: 12 layers, 12 heads,
# 4 KV heads, vocab 50304, seq 2048; pico-lm/pretokenized-dolma streamed from the Hub, 1024
# sequences x 2048 tokens per step, 200,000 steps (one pass), lr 3e-4 with 2,500 warmup steps then
# linear decay; bf16 and DeepSpeed ZeRO-2 on GPUs. Per-GPU sub-batch = 1024 / (128 x GPUs): raise
# gradient_accumulation_steps if it does not fit, lower it if memory is to spare.
run_name = "pico-decoder-small"
d_model = 384
activation_hidden_dim = 1536
