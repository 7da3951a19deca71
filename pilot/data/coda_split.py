"""CODA-Prompt's ImageNet-R train/test split, stored as a bit mask over the sorted file list.

CODA-Prompt (Smith et al., CVPR 2023) does not split ImageNet-R by a seeded rule: it reads two
fixed lists, ``dataloaders/splits/imagenet-r_train.yaml`` (24,000 images) and
``dataloaders/splits/imagenet-r_test.yaml`` (6,000 images), in
https://github.com/GT-RIPL/CODA-Prompt (files last changed in commit
22948d288bd587ae4215e4cb64e1dce2c14ed61f, 2023-04-13; read at commit
6417d4f68754be68b697c7ca2323ee61e791e1a3). Each list names images as
``data/imagenet-r/<wnid>/<file>.jpg``; together they hold the 30,000 images of the original
ImageNet-R archive once each, and no image is in both.

Instead of shipping the 1.4 MB of YAML, we keep the facts needed to rebuild the split from the
archive itself: the 30,000 paths ``<wnid>/<file>`` sorted as Python sorts strings, the SHA-256 of
that list joined with newlines (so a different file set is refused, not split wrongly), and one bit
per path, most significant bit first, set for the test images (zlib-compressed, base64). The
SHA-256 of the sorted test list checks the decoding. ``pilot.data.splits.file_list_split_from_coda_yaml``
rebuilds these values from the two YAML files.
"""

from __future__ import annotations

SOURCE = "https://github.com/GT-RIPL/CODA-Prompt/tree/6417d4f68754be68b697c7ca2323ee61e791e1a3/dataloaders/splits"
TRAIN_YAML_SHA256 = "6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845"  # imagenet-r_train.yaml
TEST_YAML_SHA256 = "57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a"  # imagenet-r_test.yaml
NUM_FILES = 30000
NUM_TEST = 6000
FILES_SHA256 = "bcec52bcadc9a1f805e1bd5130fb77568200641d4a8054dbf3c961f4bf22401b"
TEST_SHA256 = "9e7f6243e605e2223739b158f26e442480eb940f9e24508bf6c02c939efdcc26"
MASK = (
    "eNoVV21sHMd5ft7ZudXcciXNHY/ykmWMueORPVGMcWToQHU/MHs6KidWNlasktKpCxxluWBbFZALFEiLAJ07npgVQ9grWTHU"
    "BA2WEhvQRgOoQFH4T4EjIxlymgK04wD+VyYtjLi/BATo7768H4fD7t7OzvP1PgvamjDWpSWnnO1GHlpPoVVM7gRNlSnT6kY0"
    "fLbxx9snHBppc0ebaPyPvhEKqm9285pQjfXYWo2n6GG/EH7WPWvNFf59SJEllWfgT/8fTx7CQjgqNTtdnCbU71pRtVpUKp3d"
    "O9dFx8FzsE4bYAGx1FslTF2dL8NZU2q4/rnvXklmntEAqZBS8R2NcG2lpNUBprTUyxWNtt+galHUKx1Y88uht8KXdQf8VRH8"
    "eAoFfVvfFAL8Uzp7dPxcf2fsroaRSIaHshVCYFv1tKqp0hPhj+SI8O/3imJd4oy1siHLgaa+nbAwRmxPPq4AyYadRRXiNZC1"
    "WXvktkFqlbjvdLwA2joQiR2+0b3cHIjkrr0E/Slm9pwaZMK+04K5WRXfOvBJIYqAki6jJlHraeDiaLH8Rit4r7bXhBLx7uUS"
    "XYFz4FMTpSBlWCQCk9qm53kw2segcLWrEjVYLAM7wO/ZFQhtifcaSlX0RgmW6JgKVRC3Gb1aVftLJCswiSgBxTM59EFSQHOF"
    "xB6Mc2/dqrgrXTtKY6sM4ULekONYtp2RCE6jlJ2YMPp7d8nKvm2QT6jkjCu+2kO7dw6Ia/qamQeFVilezdpPQ5xXLIDMAZEE"
    "wqOH5tlf4XevJIIEnlXLlKMXUL2FuhaZ9A+H0vb5sqpnzmuFYaROfD3xhJwbBGeU8m/FTji10ReaWb+RSg9C+STV/tB98Jqd"
    "9DUJUsLuxzRcFbafT0lsyx4CiI8E0pNQ9qeLAaRg5s8y+SdF6XzzdaFVXX5GolkLihP6GlXTwDjFiLfeJUwbWHVSdwd3Ls0m"
    "P8ssrl5QJips+GPMXIGa2vSHHbx5tuxUQa5KyxJ1SBzDX4hs6H/sqrnpWldv9CWmaqyzLBoq1s2mflG7NHtTmEUtDeFyZRCA"
    "RCeUQpEntcUQaDNiPXSaJZuZo9TMiIXNucb83+zQEnQ9RWVWRWU0yLCuX/1IqJpGDbrsnjSwiPuse1kFRu6lENfxq3NtO7hH"
    "7xsPZ5StGEFFXuAmTHppSscK4qqstCTlehrwWggbOnF3YnbMsF5IO2tlYnpY9Y/DH8A1FJbgxoaffwGzjs2Ur3Lbif7i28Tb"
    "ajnmJFeoCqm8bLOG3P6bLf62xt//fgV90xY9vceKiWr8JXSnEPGu63kjxoPT8CmamwNNVC3LJY7CbC3c9ne6vY0sV1r0lJN/"
    "EZ3vUo+SrcQF/7Tv5nRCxklp/YlcVFga3Ww/dhvA/Z5F8WwKo6ylbIDxlnzI6/3v9gzVWvproArBWJ8MUcFZ7RJElwsVJOM6"
    "4wyxnskv9hVyuWXPgx0nqFffh4G2b3OmBY1mNwgXLv46gDvD0LG+LJpUq7/yCuxAbuJzc+tf2BfxC/+hpmb9i5hnjn42FDgL"
    "lbGytmz6PHJCpNfKd1GtkpO2wBYfO9OdY9lBM+2KhG5i/toAZVsLEQv/XEurIbnGmKQy+6/NYaQ8BKylH6509wZvKIGEkItf"
    "aAGlX1yPHgByBDR4utGqIRL78/qsnazUF9u3knWIlZyJNnIdJDmeC/N0fcxwzuRDJSTkUWdZWvsh/rPU+NAToEUMXj6Bu5eY"
    "l5uTNbeHUvHn7g/5YXNMcw5NUEuzcBmGgXxuC8OBLJtOYDBXSp+QTT7d6KmePVrivTX8B38qDqwadxW7k46H6smAh8M4B5bB"
    "Jj6G8yJWfo+5MqriSoy95jX7RhO1n6JfOvaXUwGHjsseA3NIEOLQFs7iaPKu9hg5Th1Ct+XG+X/iWJrSnUNdIuwXY1DdiPyA"
    "zdHP+E6llxq8LEwB55hlVtJvGigY3Y4VH6129p4L0ItQMlp/U8ZOUYx3mtW36jenWwx1YfBbbv56nXMDnkccqJdrsab4Eqnt"
    "ktKHmhfvuKZZOx0MpJkTFbSclfl3GSNbaEiKeP0zBuZujkcfCw4Z6fphFj9xH6Da3P+KNfpt3uQRy2j2pq2b9nmeZFdP+FUl"
    "5YPSAFHnHsq6GQCdCCcyNdLB9KNETn9gXIQuEvu+X/qET9qqeUiMgvaGn7yO3RpzPtdm+y1hyfVadb4ivua8RCU3GkHTxEZV"
    "TdnzE2w32UDNElbQk+9cb2dCv+dUdpaDnKHxZeJkpsrjv66SjxWjeHw9FXgReuj0NWmNEkrPWOipXUg+J+XeIac6iqveWonz"
    "Z1Lpr8OEbdPFtVS7wj9fnySEtbBmnRDJuoqjDQ6z9a6rjs8lxfoE9jYimwVXGVMKWCqyOduW4dIdLbR0SKcbC02OO37ySKZi"
    "lMSkO7nZK3LCaMgHWx1JIYbvSTzm8e96NMQ1UneNXxUefkdXJhoLeXlQLvKs8bCpltGUtZc6cfMB/itVRddLno8hbtrcvlDD"
    "uQBh5hLFHOIrMkJDcvwicG55YGeLc0j9tWTT6RZrSqcWByRlX1khO87DUkzBhUdojQ33Dl15drkdDJrmJIF6og6pQfOmnBGe"
    "HdcTTrvF0Hk9NWWpHzF9NtWrwug9vVUsyN1bQ+3aHUZCa1YqA5LaNchC5I1luXC4kKEqF294hd3Wpgh0IRZqhAwePlutTv8r"
    "3urWhl3QbBXfub9B1wqdLxVReg6Ve20ZXVzzter7EdKZ09bAteE/9mlfVTjeFugzhWP4PTK/yU2+zP7Gt64C71Ok/xo/aC4a"
    "fJMrkUXQOfhq5kTTNDqv+x06csOH7L+N45n1qMY08fT4B9kp4k+oSZpu/d+rHxJqXAREvfgauJcNIXM0R1A67nDk3ldQLvGO"
    "by2XuUvWYjYtDy/X2P1bpcTGLdUnb/QBdTFZKbnPmhDZnOW/GMqfZ+D4HhMbGs4IE1t0SZegZnQh5JAxXAR6ui7UX8YFF1iZ"
    "rMi6OC4rt3Ern/5+2S7XuG8VJXZ+nNZH1fhAEu5zC025m7LjxfwqjdbElSXIl0paBhwU35Cq8oZq9l/lvHLvMpHVnX74UNv7"
    "5vL3+xhFuWVCfqCN3SUc5oeor7dhW8dqslZZ1z1YQoEVN61OFb9AJQxbuRMeO76kpvG55WnFZjINjU2TyYcyRnvYtZNt08YL"
    "N2D7LWTtoOIFkgchx2DUN7NaV20+w/JlM96+g0ujZUci49HM7ctOyC/9D9Sjp7h54ct+435hpWq6ZsfRJ2BXmyO81F1CKP3M"
    "MiN+6VhnHhuKo0/J3r1KNnnMTq6KBd4HKyMWomLr5PbiU3KGQnI1y+bs4HqkwsrLoQxk+h3WjCG3G5k/0z+CjzfFcZ83Ze7T"
    "9Qhyr+ISLuUHY/kpgb7PFAZiYPQSspWTPe12wnD19jaKeiaqQBufayK+B9OnL7t3utmduTLP59g8WgpE2tUzL+MxK61wyj4b"
    "SOz/GG7iXY6u1amnqO79MoMoq/+O2JkRfkFrC169vEzeUBNOIMW44uT8Cer+j0Ro6RQu8tZN1lPN/aqF88MlfVlaLivSk6eG"
    "fKSPn+73MMpKOf9DqlOTh5DHnmwzOhfQX1AqZ9D4CBUqPGLrb+NXfKBEOHI7A1xMrIiljwuOuOcL6WjkKqrFOj6SxbRviGsm"
    "v+I8vsdts2/rXOXEkEd3HU+zA77J8p26GN7vh5PkzO5SdyL5Ca7E1e3IBup0epdG5oRvuRRzIbXTfs5BvPXYP69LwyeaLK2Q"
    "5TYiAofVo9WkyXS2w84gO8N7smfKnYhj3IhXgK9xfHFPMshvHY9Ln8o8T+Ae2+HPuShzBSiuVXuXBP7c8Nyxx69Ztd5Akyyu"
    "b4pPv83/SP9Aa475e3utfCCkkNmF47kc9JsgDfviR82GJ71GCbkqNej8bNU2wa8/il/w0j7o/wHb9ud5"
)
