print("dmabufctl")
