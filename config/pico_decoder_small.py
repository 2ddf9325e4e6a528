# pico-decoder-small (64,595,328 parameters), one of the published pico-decoder sizes.
# launch (one node, 4 GPUs; DeepSpeed ZeRO-2 by default):
#   torchrun --nproc_per_node=4 train.py config/pico_decoder_small.py --run_name=my-small
# streams pico-lm/pretokenized-dolma from the Hub: 1024 sequences x 2048 tokens per optimizer
# step, bf16, 200,000 steps (one pass over dolma), linear warmup then linear decay.
run_name = "pico-decoder-small"

d_model = 384
activation_hidden_dim = 1536
n_layers = 12
attention_n_heads = 12
attention_n_kv_heads = 4
vocab_size = 50304
max_seq_len = 2048

dataset_name = "pico-lm/pretokenized-dolma"
eval_dataset_name = "pico-lm/pretokenized-paloma-tinsy"
batch_size = 1024
gradient_accumulation_steps = 128  # per-GPU sub-batch = 1024 / (128 x n_gpus); raise it if memory is short
max_steps = 200_000
lr = 3e-4
lr_scheduler = "linear_with_warmup"
lr_warmup_steps = 2500
precision = "bf16"
save_every_n_steps = 1000
