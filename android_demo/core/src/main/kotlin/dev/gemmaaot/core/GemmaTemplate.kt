package dev.gemmaaot.core

/** Who said a message. [wire] is the role name the OpenAI-style APIs and our Python runtime use. */
enum class Role(val wire: String) {
    SYSTEM("system"), USER("user"), MODEL("assistant");

    companion object {
        fun fromWire(name: String): Role = when (name) {
            "system" -> SYSTEM
            "user" -> USER
            "assistant", "model" -> MODEL
            else -> throw IllegalArgumentException(
                "unknown chat role '$name'; use system, user or assistant")
        }
    }
}

data class ChatMessage(val role: Role, val content: String)

/**
 * Gemma's chat template, exactly as the Python runtime renders it (`runtime.chat.render_chat`):
 *
 *     <bos><start_of_turn>user\n{system\n\n}{text}<end_of_turn>\n<start_of_turn>model\n...
 *
 * A system message is prepended to the first user turn; roles alternate user/model starting with
 * user; content is stripped of surrounding whitespace with Python's `str.strip()` rules. A golden
 * file written by the Python tests (`golden_prompts.json`) keeps the two implementations, and these
 * constants, equal to `runtime/chat.py`'s.
 */
object GemmaTemplate {
    const val BOS = "<bos>"
    const val START_OF_TURN = "<start_of_turn>"
    const val END_OF_TURN = "<end_of_turn>"

    /** (role, content) per turn after the template's rules; throws IllegalArgumentException. */
    fun turns(messages: List<ChatMessage>): List<Pair<String, String>> {
        require(messages.isNotEmpty()) {
            "chat messages must be a non-empty list of {'role', 'content'} dicts"
        }
        var rest = messages
        var system = ""
        if (rest.first().role == Role.SYSTEM) {
            system = pyStrip(rest.first().content) + "\n\n"
            rest = rest.drop(1)
        }
        val out = ArrayList<Pair<String, String>>()
        rest.forEachIndexed { i, m ->
            require(m.role != Role.SYSTEM) { "unknown chat role 'system'; use system, user or assistant" }
            val expected = if (i % 2 == 0) Role.USER else Role.MODEL
            require(m.role == expected) {
                "chat roles must alternate user/assistant, starting with user " +
                    "(message $i is '${m.role.wire}')"
            }
            val role = if (m.role == Role.USER) "user" else "model"
            val content = pyStrip(m.content)
            out += role to (if (i == 0) system + content else content)
        }
        require(out.isNotEmpty()) { "chat needs at least one user message" }
        return out
    }

    /** The whole prompt for the model's next turn, control tokens spelled as text. */
    fun render(messages: List<ChatMessage>): String {
        val sb = StringBuilder(BOS)
        for ((role, content) in turns(messages)) {
            sb.append(START_OF_TURN).append(role).append('\n').append(content)
                .append(END_OF_TURN).append('\n')
        }
        return sb.append(START_OF_TURN).append("model\n").toString()
    }

    /** The turn templates our exporter writes into the bundle's LlmMetadata. */
    const val USER_PREFIX = "<start_of_turn>user\n"
    const val USER_SUFFIX = "<end_of_turn>\n"
    const val MODEL_PREFIX = "<start_of_turn>model\n"

    /**
     * What to hand a fresh LiteRT-LM `Session` so that the model sees exactly [render]: the session
     * adds the start token and wraps its input in the bundle's user prefix/suffix and model prefix
     * (and refuses input that spells the BOS token), so those are left off here.
     */
    fun sessionInput(messages: List<ChatMessage>): String {
        val full = render(messages)
        val head = BOS + USER_PREFIX
        val tail = USER_SUFFIX + MODEL_PREFIX
        check(full.startsWith(head) && full.endsWith(tail) && full.length >= head.length + tail.length)
        return full.substring(head.length, full.length - tail.length)
    }

    /** Python's str.isspace(): what str.strip() removes (Kotlin's trim() differs, e.g. U+001C). */
    fun isPythonSpace(c: Char): Boolean = c in '\u0009'..'\u000d' || c in '\u001c'..'\u0020' ||
        c == '\u0085' || c == '\u00a0' || c == '\u1680' || c in '\u2000'..'\u200a' ||
        c == '\u2028' || c == '\u2029' || c == '\u202f' || c == '\u205f' || c == '\u3000'

    fun pyStrip(s: String): String = s.trim(::isPythonSpace)
}
