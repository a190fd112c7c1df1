"""`make chaos`: the fault suite (docs/chaos.md). Each scenario starts the local
stack it needs (e2e/stack.py), injects its faults, prints exact counts and
stops what it started. Files are named chaos_*.py so that `make e2e`, which
collects test_*.py under e2e/, never runs them."""
