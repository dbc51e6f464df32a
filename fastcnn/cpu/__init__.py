"""The "cpu" backend's launchers, below fastcnn.ops (they import nothing above them): oneDNN
convolutions called by the C++ extension directly or through torch's mkldnn ops (onednn.py,
winograd.py choosing Winograd F(4x4, 3x3)), the Inception block (inception.py), int8 convs and
conversions (int8.py), max-pooling (pool.py) and the packed classifier (linear.py)."""
