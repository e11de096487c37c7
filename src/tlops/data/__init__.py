"""Data: discovery and splits (``discovery``), the shared manifest (``manifest``), local and S3 storage
(``storage``), the data checks (``validation``), request image bounds (``images``) and a font-rendered target
domain (``fontdigits``)."""
