"""C++/CUDA sources of abnexp's native kernels, shipped as package data (``abnexp.kernels``);
:mod:`abnexp.norm.native` builds them just in time."""
