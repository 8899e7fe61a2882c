"""Cross-task aware filters (CRAFT / ETL) as scikit-learn estimators."""

__version__ = "0.1.0"
