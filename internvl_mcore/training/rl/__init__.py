"""Online RL building blocks (issue #28): group-normalized advantages, the GSPO / GRPO policy losses
and their megatron-core loss function, and the reward verifiers. No rollout loop and no `--stage gspo`
yet (docs/rl.md says what exists)."""
