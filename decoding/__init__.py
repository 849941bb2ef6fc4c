"""cfic.decoding"""
