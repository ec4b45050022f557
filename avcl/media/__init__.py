"""Media: decoding video files, dataset manifests, feature extraction (``avcl extract``)."""
