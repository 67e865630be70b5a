"""What this machine can hold: the hardware probe and profiles, the memory planner, and tuned settings."""
