"""Ray Data pair mining and the Ray Train + DeepSpeed LoRA-DPO trainer."""
