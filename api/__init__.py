"""cfic.api"""
