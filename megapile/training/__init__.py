"""The training loop's parts (the loop itself is megapile/train.py, the entry point users start): building a
run (build.py), its position and state (run_state.py), optimizer and LR schedule (optim.py), loss-spike
handling (spikes.py), FLOPs and MFU (flops.py)."""
