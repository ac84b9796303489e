"""Process-wide switches of the Python front ends (never read by the compiled core)."""

# When True, front ends allocate kernel outputs filled with NaN instead of uninitialised memory,
# so a test sees any element a kernel forgot to write. Set through gmattn.testing.poisoned_outputs.
poison_outputs = False
