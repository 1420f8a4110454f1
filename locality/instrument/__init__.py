"""The instrument at run time: capture each layer's features on the probe set before and after fine-tuning,
the step-0 objective distance, the NTK profile, the end-of-run report and dropping top blocks, as Lightning
callbacks and helpers; the numbers themselves are `locality.measure`'s."""
