"""Training-side code for MobileMoE: corpus building, data loading, training loops."""
