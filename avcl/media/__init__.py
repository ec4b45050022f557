"""Layer ``media``: file formats only; imports ``core``.

* ``decode``: video files to frames and audio (PyAV); ``encode``: clips to video files;
* ``audio``, ``frontend``: Kaldi filterbanks and the audio front-ends of feature extraction;
* ``manifests``: the benchmarks' dataset lists (VGGSound, Kinetics-Sounds, AVE, ...) and video folders.

Feature extraction itself (``avcl extract``) is a program built on these: ``avcl.apps.extract``.
"""
