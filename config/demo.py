# The demo: a small pico-decoder trained on the embedded corpus (the King James Bible, tokenized
# with the OLMo tokenizer) on a CPU, with no network.
#   python train.py config/demo.py
#   torchrun --standalone --nproc_per_node=2 train.py config/demo.py --run_name=demo2   (or 4 processes)
# Expect the validation loss to fall from 10.98 at step 0 to about 5.6 at step 100, in about 3
# minutes on a 2-core CPU (checkpoints with learning dynamics at steps 0, 1, 2, 4, 8, 16, 32, 50
# and 100); the run ends with a sample continuation of "And God said". Then draw it:
#   python dynamics.py plot runs/demo
run_name = "demo"
dataset_name = "data/demo"  # or your own: python data.py tokenize ... --out data/mine --val-every 20
dataset_split = "train"
eval_dataset_name = None  # the training data's held-out split (data/demo/validation.parquet)
learning_dynamics_eval_data = None  # the evaluation data
sample_prompt = "And God said"

# 2049-token rows are read as 8 sequences of 257 tokens
max_seq_len = 256
d_model = 64
n_layers = 4
attention_n_heads = 2
attention_n_kv_heads = 1
activation_hidden_dim = 256

batch_size = 16  # sequences of 256 tokens per step = 2 micro-steps x processes x sub-batch (8, 4 or 2 for 1, 2, 4)
gradient_accumulation_steps = 2
max_steps = 100
lr = 3e-3
lr_warmup_steps = 10
save_every_n_steps = 50
save_log_spaced_until = 32  # also steps 1, 2, 4, ..., 32: the first steps change the model most (Pythia did the same)
log_every_n_steps = 10
eval_batch_size = 25
learning_dynamics_batch_size = 25  # rows per capture batch over all processes
