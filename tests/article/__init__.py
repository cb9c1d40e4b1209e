"""Copies of the article's four query methods, defects kept, used as defect tests and benchmark baselines."""
