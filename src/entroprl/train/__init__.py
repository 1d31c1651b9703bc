"""The trainer and what it stands on: the training loop (`trainer`), the forward passes
(`forward`), the policy's loading and device (`policy`, `lora`), its layout over ranks and
precision (`distributed`, `parallel`, `precision`, `allocator`), the run directory and
checkpoints (`rundir`, `checkpoint`), seeds (`seeds`), progress bars (`progress`) and what to
lower when memory runs out (`out_of_memory`)."""
