"""The engine: the step loop, the scheduler and its KV pages, the step's inputs, the one SPMD
step program with sampling, and start-up (weights placed, KV sized, steps precompiled)."""
