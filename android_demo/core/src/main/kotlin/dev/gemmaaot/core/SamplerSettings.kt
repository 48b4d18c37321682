package dev.gemmaaot.core

/**
 * Sampling settings the engine receives. temperature 0 means greedy. The limits are the Python
 * runtime's (`runtime.sampling.validate`) plus the sizes a phone can afford.
 */
data class SamplerSettings(
    val temperature: Double = 0.8,
    val topK: Int = 40,
    val topP: Double = 0.95,
    val maxNewTokens: Int = 512,
    val seed: Int = 0,
) {
    /** Every problem, each a sentence naming the field; empty when valid. */
    fun problems(maxContext: Int = 4096): List<String> = buildList {
        if (!temperature.isFinite() || temperature < 0.0 || temperature > 2.0)
            add("temperature must be between 0 and 2 (0 is greedy), got $temperature")
        if (topK < 1) add("top-k must be at least 1, got $topK")
        if (!topP.isFinite() || topP <= 0.0 || topP > 1.0) add("top-p must be in (0, 1], got $topP")
        if (maxNewTokens < 1 || maxNewTokens >= maxContext)
            add("max new tokens must be between 1 and ${maxContext - 1}, got $maxNewTokens")
    }

    fun validated(maxContext: Int = 4096): SamplerSettings {
        val p = problems(maxContext)
        require(p.isEmpty()) { p.joinToString("; ") }
        return this
    }

    companion object {
        /** Parses the settings screen's text fields; problems name the field that did not parse. */
        fun parse(temperature: String, topK: String, topP: String, maxNewTokens: String,
                  maxContext: Int = 4096): Pair<SamplerSettings?, List<String>> {
            val errors = ArrayList<String>()
            val t = temperature.trim().toDoubleOrNull() ?: run { errors += "temperature is not a number: '$temperature'"; null }
            val k = topK.trim().toIntOrNull() ?: run { errors += "top-k is not a whole number: '$topK'"; null }
            val p = topP.trim().toDoubleOrNull() ?: run { errors += "top-p is not a number: '$topP'"; null }
            val m = maxNewTokens.trim().toIntOrNull() ?: run { errors += "max new tokens is not a whole number: '$maxNewTokens'"; null }
            if (errors.isNotEmpty()) return null to errors
            val s = SamplerSettings(t!!, k!!, p!!, m!!)
            val problems = s.problems(maxContext)
            return (if (problems.isEmpty()) s else null) to problems
        }
    }
}
