/* JPEG decode (with DCT scaling) and encode through the system's libjpeg-turbo, the library
 * Pillow and img2dataset use. libjpeg reports fatal errors through error_exit, which must not
 * return; it jumps back to the entry point here, so no longjmp ever crosses a Rust frame. */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <jpeglib.h>
#include <jerror.h>

enum { PARTI_OK = 0, PARTI_BAD = 1, PARTI_UNSUPPORTED = 2 };

struct parti_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int truncated;
};

static void parti_error_exit(j_common_ptr cinfo) {
  struct parti_error *err = (struct parti_error *)cinfo->err;
  longjmp(err->jump, 1);
}

/* Warnings are not printed (a crawl has millions); a premature end of data is remembered so a
 * truncated file is refused instead of padded with grey. Other warnings (stray bytes before a
 * marker, say) decode as Pillow decodes them. */
static void parti_emit_message(j_common_ptr cinfo, int level) {
  struct parti_error *err = (struct parti_error *)cinfo->err;
  if (level < 0) {
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) err->truncated = 1;
    cinfo->err->num_warnings++;
  }
}

static void parti_error_init(struct parti_error *err) {
  jpeg_std_error(&err->pub);
  err->pub.error_exit = parti_error_exit;
  err->pub.emit_message = parti_emit_message;
  err->truncated = 0;
}

static int rgb_convertible(J_COLOR_SPACE space) {
  return space == JCS_YCbCr || space == JCS_RGB || space == JCS_GRAYSCALE;
}

/* Reads the header: the stored size and whether the colour space converts to RGB here (CMYK
 * and YCCK do not). With `out` set, then decodes to 8-bit RGB at scale_eighths/8 of the stored
 * size (the reduced inverse DCT skips most of the work on large photos); `out` holds exactly
 * out_width * out_height * 3 bytes, the size libjpeg computes (rounding up), and any other
 * output size is refused before a byte is written. */
int parti_jpeg_decode(const unsigned char *data, unsigned long size, unsigned *width,
                      unsigned *height, int *rgb, unsigned scale_eighths, unsigned char *out,
                      unsigned out_width, unsigned out_height) {
  struct jpeg_decompress_struct cinfo;
  struct parti_error err;
  JSAMPROW rows[16];
  cinfo.err = &err.pub;
  parti_error_init(&err);
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return PARTI_BAD;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  *width = cinfo.image_width;
  *height = cinfo.image_height;
  *rgb = rgb_convertible(cinfo.jpeg_color_space);
  if (out == NULL || !*rgb) {
    jpeg_destroy_decompress(&cinfo);
    return *rgb ? PARTI_OK : PARTI_UNSUPPORTED;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = scale_eighths;
  cinfo.scale_denom = 8;
  jpeg_start_decompress(&cinfo);
  if (cinfo.output_width != out_width || cinfo.output_height != out_height ||
      cinfo.output_components != 3) {
    jpeg_destroy_decompress(&cinfo);
    return PARTI_BAD;
  }
  while (cinfo.output_scanline < cinfo.output_height) {
    unsigned first = cinfo.output_scanline, count = cinfo.output_height - first, i;
    if (count > 16) count = 16;
    for (i = 0; i < count; i++) rows[i] = out + ((size_t)first + i) * out_width * 3;
    jpeg_read_scanlines(&cinfo, rows, count);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return err.truncated ? PARTI_BAD : PARTI_OK;
}

/* Baseline JPEG of an RGB buffer, chroma 4:2:0 or 4:4:4, into a buffer libjpeg allocates;
 * release it with parti_jpeg_free. */
int parti_jpeg_encode(const unsigned char *rgb, unsigned width, unsigned height, int quality,
                      int subsample_420, unsigned char **out, unsigned long *out_size) {
  struct jpeg_compress_struct cinfo;
  struct parti_error err;
  JSAMPROW rows[16];
  *out = NULL;
  *out_size = 0;
  cinfo.err = &err.pub;
  parti_error_init(&err);
  if (setjmp(err.jump)) {
    jpeg_destroy_compress(&cinfo);
    free(*out);
    *out = NULL;
    return PARTI_BAD;
  }
  jpeg_create_compress(&cinfo);
  jpeg_mem_dest(&cinfo, out, out_size);
  cinfo.image_width = width;
  cinfo.image_height = height;
  cinfo.input_components = 3;
  cinfo.in_color_space = JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, quality, TRUE);
  cinfo.comp_info[0].h_samp_factor = subsample_420 ? 2 : 1;
  cinfo.comp_info[0].v_samp_factor = subsample_420 ? 2 : 1;
  jpeg_start_compress(&cinfo, TRUE);
  while (cinfo.next_scanline < cinfo.image_height) {
    unsigned first = cinfo.next_scanline, count = cinfo.image_height - first, i;
    if (count > 16) count = 16;
    for (i = 0; i < count; i++) rows[i] = (JSAMPROW)(rgb + ((size_t)first + i) * width * 3);
    jpeg_write_scanlines(&cinfo, rows, count);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  return PARTI_OK;
}

void parti_jpeg_free(unsigned char *buffer) { free(buffer); }
