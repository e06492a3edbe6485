"""The factory's conversion wing: our ONNX models into the formats of accelerators that cannot
run them whole (the RK3588 NPU's .rknn), and the checks that the result still detects."""
