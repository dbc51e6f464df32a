"""CPU launchers of the "cpu" backend that go through oneDNN (torch's mkldnn ops), beside the C++
extension's own CPU kernels (csrc/cpu). Imported lazily by fastcnn.ops."""
