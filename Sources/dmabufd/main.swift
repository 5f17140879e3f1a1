print("dmabufd")
